"""The building blocks of the OpenAPI document's tables (:mod:`openapi_schemas` and the modules
it merges, :mod:`openapi_rollouts`, :mod:`openapi_console`): schema shorthands, references, and
the shapes of a JSON answer and a JSON body."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
COUNT: Schema = {"type": "integer", "minimum": 0}
BOOL: Schema = {"type": "boolean"}


def ref(name: str, kind: str = "schemas") -> Schema:
    """A reference to ``#/components/<kind>/<name>``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    """An object schema of ``properties``, ``required`` ones among them."""
    out: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def json_content(schema: Schema) -> dict[str, Schema]:
    return {"application/json": {"schema": schema}}


def ok(schema: Schema | None, description: str = "OK") -> Schema:
    """A 200 response: ``schema`` as JSON, or no body."""
    return {"description": description, "content": json_content(schema)} if schema else {"description": description}


def body(schema: Schema, required: bool = False) -> Schema:
    """A JSON request body."""
    return {"required": required, "content": json_content(schema)}
