"""Routes: a name clients call like a model, split by weight across targets, with shadow traffic.

::

    routes:
      - name: fraud
        split:
          - {target: fraud_a, weight: 90}      # target = model or model:version
          - {target: fraud_b:3, weight: 10}
        sticky: header:x-user-id             # same key -> same target (HTTP header / gRPC metadata)
        shadow: {target: fraud_c, fraction: 0.25, max_in_flight: 64}
        rollout: {candidate: fraud_d, steps: [shadow, 5, 25, 50, 100], ...}   # rollout_config

The split is deterministic by a stable hash of the sticky key when one is configured and
present, random otherwise. A route table is replaced in one step, after validation.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnxgate.core.sections import unrepresentable
from onnxgate.core.traffic.rollout_config import RolloutConfig
from onnxgate.core.traffic.targets import Target
from onnxgate.errors import InvalidInput

__all__ = ["Route", "RouteTable", "Shadow", "Target", "parse_route", "parse_routes"]

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 token, lower-cased


@dataclass(frozen=True, slots=True)
class Shadow:
    target: Target
    fraction: float
    max_in_flight: int


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    split: tuple[tuple[Target, float], ...]  # (target, weight), weights relative
    sticky_header: str = ""  # lower-case header / metadata key
    shadow: Shadow | None = None
    rollout: RolloutConfig | None = None  # the candidate walked in by evidence (core.traffic.rollouts)

    @property
    def primary(self) -> Target:
        """The target with the largest weight: its metadata, config and readiness are the route's."""
        return max(self.split, key=lambda tw: tw[1])[0]

    def targets(self) -> list[Target]:
        out = [t for t, _ in self.split]
        if self.shadow:
            out.append(self.shadow.target)
        if self.rollout is not None and self.rollout.candidate not in out:
            out.append(self.rollout.candidate)
        return out

    def to_dict(self) -> dict:
        doc: dict[str, Any] = {
            "name": self.name,
            "split": [{"target": str(t), "weight": w} for t, w in self.split],
        }
        if self.sticky_header:
            doc["sticky"] = f"header:{self.sticky_header}"
        if self.shadow:
            doc["shadow"] = {
                "target": str(self.shadow.target),
                "fraction": self.shadow.fraction,
                "max_in_flight": self.shadow.max_in_flight,
            }
        if self.rollout is not None:
            doc["rollout"] = self.rollout.to_dict()
        return doc


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where} must be a number, got {value!r}")
    return float(value)


def parse_route(doc: Any) -> Route:
    """One route from its YAML/JSON form; raises InvalidInput naming what is wrong."""
    if not isinstance(doc, Mapping):
        raise InvalidInput(f"a route must be a mapping, got {doc!r}")
    if (problem := unrepresentable(doc)) is not None:  # shown (GET /v2/routes) and shared as JSON
        raise InvalidInput(f"route {doc.get('name')!r}: not representable as JSON, {problem}: integers must fit "
                           "in 64 bits and text must be Unicode")
    unknown = sorted(map(str, set(doc) - {"name", "split", "sticky", "shadow", "rollout"}))
    if unknown:
        raise InvalidInput(f"route {doc.get('name')!r}: unknown key(s) {unknown}")
    name = doc.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise InvalidInput(f"route name must be a non-empty string without '/', got {name!r}")
    split_doc = doc.get("split")
    if isinstance(split_doc, str):  # a single target
        split_doc = [{"target": split_doc, "weight": 1}]
    if not isinstance(split_doc, list) or not split_doc:
        raise InvalidInput(f"route '{name}': split must be a non-empty list of {{target, weight}}")
    split = []
    for i, item in enumerate(split_doc):
        where = f"route '{name}' split[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"target", "weight"}:
            raise InvalidInput(f"{where}: must be {{target, weight}}, got {item!r}")
        weight = _number(item.get("weight", 1), f"{where} weight")
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise InvalidInput(f"{where}: weight must be a positive number, got {item.get('weight')!r}")
        split.append((Target.parse(item.get("target"), where), weight))
    if sum(w for _, w in split) == float("inf"):  # each finite, their sum not: every bound would be 0
        raise InvalidInput(f"route '{name}': the split's weights add up past the largest number; use smaller ones")
    if len({t for t, _ in split}) != len(split):
        raise InvalidInput(f"route '{name}': a target appears twice in split")
    sticky = doc.get("sticky") or ""
    if sticky:
        if not isinstance(sticky, str) or not sticky.startswith("header:") or len(sticky) <= len("header:"):
            raise InvalidInput(f"route '{name}': sticky must be 'header:<name>', got {sticky!r}")
        sticky = sticky[len("header:") :].strip().lower()
        if not _HEADER_NAME.fullmatch(sticky):
            raise InvalidInput(f"route '{name}': sticky must be 'header:<name>' with an HTTP header name, "
                               f"got {doc['sticky']!r}")
    shadow = None
    if doc.get("shadow") is not None:
        s = doc["shadow"]
        where = f"route '{name}' shadow"
        if not isinstance(s, Mapping) or set(s) - {"target", "fraction", "max_in_flight"}:
            raise InvalidInput(f"{where}: must be {{target, fraction, max_in_flight}}, got {s!r}")
        fraction = _number(s.get("fraction", 1.0), f"{where} fraction")
        if not 0 <= fraction <= 1:
            raise InvalidInput(f"{where}: fraction must be within 0..1, got {fraction}")
        limit = s.get("max_in_flight", 64)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInput(f"{where}: max_in_flight must be a positive integer, got {limit!r}")
        shadow = Shadow(Target.parse(s.get("target"), where), fraction, limit)
    rollout = None
    if doc.get("rollout") is not None:
        rollout = RolloutConfig.from_dict(doc["rollout"], f"route '{name}' rollout")
        rollout.check_split(tuple(split), f"route '{name}' rollout")
    return Route(name, tuple(split), sticky, shadow, rollout)


def parse_routes(docs: Any) -> tuple[Route, ...]:
    """The ``routes:`` section: a list of routes with unique names."""
    if docs is None:
        return ()
    if not isinstance(docs, list):
        raise InvalidInput("routes must be a list")
    routes = tuple(parse_route(d) for d in docs)
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise InvalidInput(f"route names must be unique, got {names}")
    return routes


def _unit(key: str) -> float:
    """A stable point in [0, 1) for ``key``, the same across processes and restarts."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class RouteTable:
    """The current routes; replaced whole, never edited in place."""

    def __init__(self, routes: Iterable[Route] = (), rng: random.Random | None = None) -> None:
        self.routes: dict[str, Route] = {r.name: r for r in routes}
        self._cumulative = {r.name: self._weights(r) for r in self.routes.values()}
        self._rng = rng or random.Random()

    @staticmethod
    def _weights(route: Route) -> list[tuple[float, Target]]:
        total = sum(w for _, w in route.split)
        acc, out = 0.0, []
        for target, weight in route.split:
            acc += weight / total
            out.append((acc, target))
        return out

    def validate(self, known_models: Sequence[str] | Mapping[str, Collection[int]]) -> None:
        """Every target must be a known model, and no route may hide a model. Given the known
        versions of each model (a mapping), a target's pinned version must be one of them."""
        versions = known_models if isinstance(known_models, Mapping) else None
        known = set(known_models)
        for route in self.routes.values():
            if route.name in known:
                raise InvalidInput(f"route '{route.name}' has the name of a model; pick another name")
            for target in route.targets():
                if target.model not in known:
                    raise InvalidInput(f"route '{route.name}': unknown target model '{target.model}'")
                if versions is not None and target.version and int(target.version) not in versions[target.model]:
                    raise InvalidInput(
                        f"route '{route.name}': unknown target '{target}': model '{target.model}' "
                        f"has no version {target.version}"
                    )

    def get(self, name: str) -> Route | None:
        return self.routes.get(name)

    def choose(self, route: Route, headers: Mapping[str, str]) -> Target:
        """The split target for one request."""
        key = headers.get(route.sticky_header) if route.sticky_header else None
        point = _unit(f"{route.name}\0{key}") if key is not None else self._rng.random()
        for bound, target in self._cumulative[route.name]:
            if point < bound:
                return target
        return self._cumulative[route.name][-1][1]

    def mirror(self, route: Route) -> bool:
        """Whether this request is mirrored to the route's shadow target."""
        return route.shadow is not None and self._rng.random() < route.shadow.fraction
