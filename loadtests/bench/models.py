"""The benchmark's models, built with ``onnx.helper`` into a model repository.

Every model has one FP32 input ``x`` [batch, IN] and one FP32 output ``y`` [batch, OUT], a
dynamic batch dim and ``max_batch_size: 256`` with dynamic batching (no queue delay: greedy).

* ``gemm16`` -- one 16x16 Gemm: overhead-bound (ONNX Runtime takes microseconds).
* ``mlp`` -- 256 -> 1024 -> 1024 -> 10 with ReLUs.
* ``big`` -- (1024 -> 4096 -> ReLU -> 1024 -> ReLU) twice, about 33.6 MFLOP per row (only with ``--models``).
* ``huge`` -- compute-bound: 4096 -> 8192 -> 4096 -> 8192 -> 4096 with ReLUs, about 268 MFLOP per row
  and 512 MiB of FP32 weights; one row costs tens of milliseconds on one core, a batch of 64 a few
  tenths of a second, so the gateway's own cost per request is a few percent of it at most.

Weights are uniform FP32 with the variance of N(0, 1/fan_in), drawn with numpy's default generator
directly in float32 (``huge`` builds in a few seconds); the values do not matter, only the shapes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtests.loadgen.grpc_client import varint

MAX_BATCH_SIZE = 256
OPSET = 17
IR_VERSION = 8
CHECKED_BYTES = 64 << 20  # models with at most this much weight are read back through the ONNX checker


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

    @property
    def weight_bytes(self) -> int:
        return sum(4 * (a + 1) * b for a, b in zip(self.widths, self.widths[1:], strict=False))


MODELS: tuple[BenchModel, ...] = (
    BenchModel("gemm16", (16, 16), "overhead"),
    BenchModel("mlp", (256, 1024, 1024, 10), "mixed"),
    BenchModel("big", (1024, 4096, 1024, 4096, 1024), "compute"),
    BenchModel("huge", (4096, 8192, 4096, 8192, 4096), "compute"),
)
BY_NAME = {m.name: m for m in MODELS}
DEFAULT_MODELS: tuple[str, ...] = ("gemm16", "mlp", "huge")  # what a run measures without ``--models``


def _weights(model: BenchModel, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Each layer's weight [IN, OUT] and bias [OUT], one layer at a time (``huge``: 128 MiB each)."""
    rng = np.random.default_rng(seed)
    for i, (a, b) in enumerate(zip(model.widths, model.widths[1:], strict=False)):
        w = rng.random((a, b), dtype=np.float32)  # U(0, 1), a few ns a value; scaled in place
        w -= np.float32(0.5)
        w *= np.float32(np.sqrt(12.0 / a))  # U(-sqrt(3/a), sqrt(3/a)): variance 1/a
        yield f"w{i}", w
        yield f"b{i}", rng.random(b, dtype=np.float32) * np.float32(0.02) - np.float32(0.01)


def _skeleton(model: BenchModel):
    """The ModelProto without its initializers: Gemm (+ Relu) per layer, x [batch, IN] -> y [batch, OUT]."""
    from onnx import TensorProto, helper

    nodes = []
    current = "x"
    layers = len(model.widths) - 1
    for i in range(layers):
        last = i == layers - 1
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
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxgate-loadtests")
    proto.ir_version = IR_VERSION
    return proto


def _len_field(number: int, length: int) -> bytes:
    """A length-delimited protobuf field's tag and length."""
    return varint(number << 3 | 2) + varint(length)


def write_onnx(model: BenchModel, path: Path, seed: int = 0) -> None:
    """Write ``model`` as one ordinary ``.onnx`` file, streaming the weights straight from numpy.

    Serializing a 512 MiB ModelProto in memory takes seconds (and a few copies of it), so the file
    is the serialized skeleton followed, for each initializer, by one more ``ModelProto.graph``
    field (7) holding just that ``GraphProto.initializer`` (5): protobuf merges repeated
    occurrences of a message field, so every reader (ONNX Runtime, ``onnx.load``) sees one graph
    with all the initializers, each a ``TensorProto`` with ``raw_data`` (9) in little-endian FP32.
    """
    from onnx import TensorProto

    if sys.byteorder != "little":
        raise RuntimeError("raw_data is little-endian: build the models on a little-endian machine")
    with open(path, "wb") as f:
        f.write(_skeleton(model).SerializeToString())
        for name, array in _weights(model, seed):
            head = TensorProto(name=name, dims=array.shape, data_type=TensorProto.FLOAT).SerializeToString()
            raw = memoryview(np.ascontiguousarray(array)).cast("B")
            raw_field = _len_field(9, raw.nbytes)
            tensor_len = len(head) + len(raw_field) + raw.nbytes
            initializer = _len_field(5, tensor_len)
            f.write(_len_field(7, len(initializer) + tensor_len))
            f.write(initializer + head + raw_field)
            f.write(raw)


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
        write_onnx(model, version_dir / "model.onnx")
        if model.weight_bytes <= CHECKED_BYTES:  # the small ones read back and pass the ONNX checker
            onnx.checker.check_model(onnx.load(str(version_dir / "model.onnx")))
        (Path(repo) / model.name / "config.pbtxt").write_text(config_text(model), encoding="utf-8")
    return Path(repo)


# --- The deadline benchmark's model (``loadtests.bench.deadline``) ---------------------------------


@dataclass(frozen=True)
class ConvBenchModel:
    """Compute-bound with a cost linear in the batch: x [batch, C] -> Tile to C x side x side ->
    ``layers`` x (Conv 3x3, C -> C, pad 1, ReLU) -> GlobalAveragePool -> y [batch, C].

    The request stays small (C floats a row, 256 B at C=64) and the weights too (147 KiB a layer
    at C=64), so ONNX Runtime's time per row hardly depends on the batch size (no weight traffic
    to amortize): a full batch costs about ``max_batch_size`` times one row's compute.
    ``DEADLINE_MODELS`` has the two the deadline benchmark runs.
    """

    name: str = "dlconv"
    channels: int = 64
    side: int = 16
    layers: int = 12

    @property
    def in_dim(self) -> int:
        return self.channels

    @property
    def out_dim(self) -> int:
        return self.channels

    @property
    def flops_per_row(self) -> int:
        return 2 * 9 * self.channels**2 * self.side**2 * self.layers


@dataclass(frozen=True)
class DeadlineModel:
    """A model of the deadline benchmark and the ``max_batch_size`` it is served with."""

    model: ConvBenchModel
    max_batch_size: int


DEADLINE_MODELS: dict[str, DeadlineModel] = {
    # The default: ~15-18 ms a row on one core here (8-10x dlconv), a batch of 16 ~260-300 ms, so
    # 3x capacity is ~150-170 requests/s and the gateway's per-request handling (~500 event-loop
    # CPU-us under load) is under a tenth of the core.
    "dlconv32": DeadlineModel(ConvBenchModel(name="dlconv32", channels=64, side=32, layers=32), 16),
    # The first benchmark's model: ~1.5-2 ms a row, 3x capacity ~1300 requests/s, whose handling
    # took 30-60 % of the gateway's core from ONNX Runtime.
    "dlconv": DeadlineModel(ConvBenchModel(name="dlconv", channels=64, side=16, layers=12), 32),
}
DEFAULT_DEADLINE_MODEL = "dlconv32"


def write_conv_onnx(model: ConvBenchModel, path: Path, seed: int = 0) -> None:
    """Write ``model`` as one ``.onnx`` file (a few MiB: serialized in memory and checked)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c, side = model.channels, model.side
    inits = [
        numpy_helper.from_array(np.array([-1, c, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array([1, 1, side, side], np.int64), "repeats"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x4"]),
        helper.make_node("Tile", ["x4", "repeats"], ["r_in"]),
    ]
    current = "r_in"
    for i in range(model.layers):
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2.0 / (9 * c)))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        current = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["y"]))
    graph = helper.make_graph(
        nodes,
        model.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxgate-loadtests")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    Path(path).write_bytes(proto.SerializeToString())


def conv_config_text(model: ConvBenchModel, name: str, max_batch_size: int, priority_levels: int = 0) -> str:
    """``config.pbtxt`` for ``model`` served as ``name``: one CPU instance, dynamic batching with
    no queue delay; with ``priority_levels`` (Triton semantics) the lowest level is the default."""
    batching = "dynamic_batching { }"
    if priority_levels:
        levels = f"priority_levels: {priority_levels} default_priority_level: {priority_levels}"
        batching = f"dynamic_batching {{ {levels} }}"
    return (
        f'name: "{name}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"{batching}\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {model.in_dim} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {model.out_dim} ] }} ]\n'
    )
