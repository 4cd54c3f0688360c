"""The HTTP handlers of the routes endpoints (``/v2/routes...``): routes, comparisons, rollouts.

A mixin of :class:`~onnxgate.frontends.http_app.HttpApp`, which finds its handlers by endpoint
name; like every handler, these translate the wire to core calls and back, nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import orjson

from onnxgate.errors import InvalidInput
from onnxgate.frontends import http_codec
from onnxgate.frontends.http_reply import CONTROL_BODY_LIMIT, Params, Receive, Reply, Scope, ok

if TYPE_CHECKING:
    from onnxgate.core.service import InferenceService


class RouteHandlers:
    """``GET/PUT/DELETE /v2/routes[/{route}]``, ``.../comparison``, ``.../rollout[/{action}]``."""

    service: InferenceService

    async def _body(self, receive: Receive, limit: int) -> bytes:  # HttpApp's
        raise NotImplementedError

    async def _routes_list(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps([r.to_dict() for r in self.service.configured_routes()]))

    async def _routes_get(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps(self.service.route(params["route"]).to_dict()))

    async def _routes_put(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        name = params["route"]
        doc = http_codec.parse_json_object(await self._body(receive, CONTROL_BODY_LIMIT))
        if doc.get("name", name) != name:
            raise InvalidInput(f"route name in the body ({doc.get('name')!r}) differs from the path ('{name}')")
        route = await self.service.put_route({**doc, "name": name}, flag(scope, "abort_rollout"))
        return ok(orjson.dumps(route.to_dict()))

    async def _routes_delete(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        await self.service.delete_route(params["route"], flag(scope, "abort_rollout"))
        return ok()

    async def _routes_rollout(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps(await self.service.rollout(params["route"])))

    async def _routes_rollout_action(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        raw = await self._body(receive, CONTROL_BODY_LIMIT)
        doc = http_codec.parse_json_object(raw) if raw else {}
        reason, full = doc.get("reason", ""), doc.get("full", False)
        if not isinstance(reason, str) or len(reason) > 500:
            raise InvalidInput("'reason' must be a string of at most 500 characters")
        if not isinstance(full, bool):
            raise InvalidInput("'full' must be true or false")
        decision = await self.service.rollout_action(params["route"], params["action"], reason, full)
        return ok(orjson.dumps(decision))

    async def _routes_comparison(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps(self.service.comparison(params["route"])))


def flag(scope: Scope, name: str) -> bool:
    """A boolean query parameter (``?name=true``; absent: false)."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    if not values:
        return False
    if values[-1].lower() not in ("true", "false", "1", "0"):
        raise InvalidInput(f"query parameter '{name}' must be true or false, got {values[-1]!r:.40}")
    return values[-1].lower() in ("true", "1")
