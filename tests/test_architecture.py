"""The package map of ARCHITECTURE.md, enforced: every import points down the layers, the
capabilities do not import each other, the front ends reach the core only through the service
and its vocabulary, and no two modules import each other, directly or around a loop.

Imports are read from the source (every ``import`` statement, also those inside functions),
so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server" / "onnxgate"
CLIENT = ROOT / "client" / "onnxgate_client"

# (unit, module prefixes, layer): a module may import its own unit and any unit of a lower layer.
UNITS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("errors", ("onnxgate.errors",), 0),
    ("core vocabulary", ("onnxgate.core.inference", "onnxgate.core.metrics", "onnxgate.core.sections",
                         "onnxgate.core.urls", "onnxgate.core.tracing", "onnxgate.core.shared_table"), 1),
    ("serving", ("onnxgate.core.serving",), 2),
    ("registry", ("onnxgate.core.registry",), 3),
    ("traffic", ("onnxgate.core.traffic",), 3),
    ("monitoring", ("onnxgate.core.monitoring",), 3),
    ("security", ("onnxgate.core.security",), 3),
    ("service", ("onnxgate.core.service", "onnxgate.core.admission", "onnxgate.core.exchange",
                 "onnxgate.core.model_control"), 4),
    ("frontends", ("onnxgate.frontends",), 5),
    ("app", ("onnxgate",), 6),  # cli, lifecycle, listeners, config, supervisor, admin, drift_report, demo
)
# What the front ends may import of the core: the service, the vocabulary of its calls, and the
# security package that says who may call what (modules, or packages with all their modules).
FRONTEND_CORE = (
    "onnxgate.core.security",
    "onnxgate.core.service",
    "onnxgate.core.inference",
    "onnxgate.core.admission",
    "onnxgate.core.serving.tensors",
    "onnxgate.core.serving.stats",
)


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules(root: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


SERVER_MODULES = _modules(SERVER, "onnxgate")


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import mod`` depends on pkg.mod (pkg/__init__ merely runs); ``from mod import x`` on mod
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path, SERVER_MODULES) for name, path in SERVER_MODULES.items()}


def unit_of(module: str) -> tuple[str, int]:
    """The unit and layer of a module: the one with the longest matching prefix."""
    if module == "onnxgate":  # the package itself holds only __version__
        return "version", 0
    best = max(
        ((unit, layer, prefix) for unit, prefixes, layer in UNITS for prefix in prefixes
         if module == prefix or module.startswith(prefix + ".")),
        key=lambda u: len(u[2]),
    )
    return best[0], best[1]


def test_every_module_has_a_unit_and_the_map_names_only_real_modules():
    assert len(SERVER_MODULES) > 40  # the walk found the package
    for _, prefixes, _ in UNITS:
        for prefix in prefixes:
            assert prefix in SERVER_MODULES, f"{prefix} in the map is not a module of the gateway"
    for module in FRONTEND_CORE:
        assert module in SERVER_MODULES, module


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in GRAPH.items():
        unit, layer = unit_of(module)
        for target in targets:
            t_unit, t_layer = unit_of(target)
            if t_unit != unit and t_layer >= layer:
                wrong.append(f"{module} ({unit}, layer {layer}) imports {target} ({t_unit}, layer {t_layer})")
    assert not wrong, "imports against ARCHITECTURE.md's package map:\n" + "\n".join(sorted(wrong))


def test_front_ends_reach_the_core_through_the_service():
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items() if module.startswith("onnxgate.frontends")
        for target in targets
        if target.startswith("onnxgate.core") and target != "onnxgate.core"
        and not any(target == m or target.startswith(m + ".") for m in FRONTEND_CORE)
    ]
    assert not wrong, "front ends may import of the core only " + ", ".join(FRONTEND_CORE) + ":\n" + "\n".join(wrong)


def _cycle() -> list[str] | None:
    """One import cycle among the gateway's modules, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_client_never_imports_the_gateway():
    client = _modules(CLIENT, "onnxgate_client")
    for name, path in client.items():
        assert not _imports(name, path, SERVER_MODULES), f"{name} imports the gateway"


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("onnxgate.core.serving.manager", "onnxgate.core.registry.local", False),  # up a layer
        ("onnxgate.core.traffic.shadow", "onnxgate.core.monitoring.sample_log", False),  # sideways
        ("onnxgate.core.service", "onnxgate.frontends.status", False),
        ("onnxgate.core.traffic.routes", "onnxgate.core.inference", True),
        ("onnxgate.lifecycle", "onnxgate.core.serving.manager", True),
        ("onnxgate.core.serving.batcher", "onnxgate.core.serving.model", True),  # within a unit
    ],
)
def test_the_rule_itself(module: str, target: str, allowed: bool):
    """The checker tells allowed from forbidden (so a green run means something)."""
    unit, layer = unit_of(module)
    t_unit, t_layer = unit_of(target)
    assert (t_unit == unit or t_layer < layer) is allowed


def test_the_cycle_finder_finds_a_cycle(monkeypatch: pytest.MonkeyPatch):
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["onnxgate.core.serving.tensors"].add("onnxgate.core.serving.batcher")  # batcher -> ... -> tensors
    monkeypatch.setattr(__import__(__name__), "GRAPH", graph)
    assert _cycle() is not None
