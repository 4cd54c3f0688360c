"""The benchmark's models, built with ``onnx.helper`` into a model repository.

Every model has one FP32 input ``x`` [batch, IN] and one FP32 output ``y`` [batch, OUT], a
dynamic batch dim and ``max_batch_size: 256`` with dynamic batching (no queue delay: greedy).

* ``gemm16`` -- one 16x16 Gemm: overhead-bound (ONNX Runtime takes microseconds).
* ``mlp`` -- 256 -> 1024 -> 1024 -> 10 with ReLUs.
* ``big`` -- compute-bound: (1024 -> 4096 -> ReLU -> 1024 -> ReLU) twice, about 33.6 MFLOP per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_BATCH_SIZE = 256
OPSET = 17
IR_VERSION = 8


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: its layer widths and what it stands for."""

    name: str
    widths: tuple[int, ...]  # input, hidden..., output
    kind: str  # "overhead" | "mixed" | "compute"

    @property
    def in_dim(self) -> int:
        return self.widths[0]

    @property
    def out_dim(self) -> int:
        return self.widths[-1]

    @property
    def flops_per_row(self) -> int:
        return sum(2 * a * b for a, b in zip(self.widths, self.widths[1:], strict=False))


MODELS: tuple[BenchModel, ...] = (
    BenchModel("gemm16", (16, 16), "overhead"),
    BenchModel("mlp", (256, 1024, 1024, 10), "mixed"),
    BenchModel("big", (1024, 4096, 1024, 4096, 1024), "compute"),
)
BY_NAME = {m.name: m for m in MODELS}


def _onnx_model(model: BenchModel, seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    layers = list(zip(model.widths, model.widths[1:], strict=False))
    for i, (a, b) in enumerate(layers):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        last = i == len(layers) - 1
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        current = out
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        model.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", model.in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", model.out_dim])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxgate-loadtests")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def config_text(model: BenchModel) -> str:
    """The model's ``config.pbtxt``."""
    return (
        f'name: "{model.name}"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        "dynamic_batching { }\n"
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {model.in_dim} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {model.out_dim} ] }} ]\n'
    )


def build_repository(repo: Path, models: tuple[BenchModel, ...] = MODELS) -> Path:
    """Write ``<repo>/<name>/1/model.onnx`` and ``<repo>/<name>/config.pbtxt`` for each model."""
    import onnx

    for model in models:
        version_dir = Path(repo) / model.name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        onnx.save(_onnx_model(model), str(version_dir / "model.onnx"))
        (Path(repo) / model.name / "config.pbtxt").write_text(config_text(model), encoding="utf-8")
    return Path(repo)
