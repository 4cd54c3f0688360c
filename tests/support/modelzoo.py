"""Build small, real ONNX models for tests.

Every ``build_*`` function writes ``<repo>/<name>/<version>/model.onnx`` and
returns the *model directory* ``<repo>/<name>`` (the place where a
``config.pbtxt`` goes, see :func:`write_config`).

All models are built with :mod:`onnx.helper`, use opset 17 and IR version 8
(accepted by onnxruntime 1.32) and are byte-for-byte deterministic: weights
come from fixed ``numpy.random.RandomState`` seeds and the producer fields are
constant.  Dynamic batch dimensions are symbolic and called ``"batch"``.

:func:`reference_run` runs a model file directly with onnxruntime so tests can
compare the gateway's answers with what onnxruntime itself produces.

Nothing runs on import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # IR version that goes with opset 17 (onnx 1.12)
PRODUCER_NAME = "onnxgate-tests"
PRODUCER_VERSION = "1"
BATCH = "batch"

# Fixed weight of the ``no_batch`` model: y = x @ NO_BATCH_WEIGHT.
NO_BATCH_WEIGHT = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]], dtype=np.float32)

# Inputs of the ``int_types`` model: name -> (numpy dtype, ONNX element type).
# Each is passed through Identity to an output called ``<name>_out``.
INT_TYPES: dict[str, tuple[type[np.generic], int]] = {
    "i8": (np.int8, TensorProto.INT8),
    "i16": (np.int16, TensorProto.INT16),
    "i32": (np.int32, TensorProto.INT32),
    "u16": (np.uint16, TensorProto.UINT16),
    "u32": (np.uint32, TensorProto.UINT32),
    "u64": (np.uint64, TensorProto.UINT64),
}

GARBAGE = b"this is not an ONNX model\x00\xff\xfe\x01garbage" * 4


# --------------------------------------------------------------------------
# internals


def _vi(name: str, elem_type: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _save(
    repo: Path,
    name: str,
    version: int,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> Path:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version_dir / "model.onnx"))
    return model_dir


# --------------------------------------------------------------------------
# public builders


def mlp_weights(in_dim: int = 16, hidden: int = 64, out_dim: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Return the weights ``build_mlp`` uses for these arguments (w1, b1, w2, b2)."""
    rng = np.random.RandomState(seed)
    return {
        "w1": (rng.randn(in_dim, hidden) / np.sqrt(in_dim)).astype(np.float32),
        "b1": (rng.randn(hidden) * 0.1).astype(np.float32),
        "w2": (rng.randn(hidden, out_dim) / np.sqrt(hidden)).astype(np.float32),
        "b2": (rng.randn(out_dim) * 0.1).astype(np.float32),
    }


def build_mlp(
    repo: Path,
    name: str = "mlp",
    version: int = 1,
    in_dim: int = 16,
    hidden: int = 64,
    out_dim: int = 10,
    seed: int = 0,
) -> Path:
    """MLP: ``x`` float32 [batch, in_dim] -> Gemm -> Relu -> Gemm -> ``y``.

    ``y`` is float32 [batch, out_dim]; weights are ``mlp_weights(...)``.
    """
    w = mlp_weights(in_dim, hidden, out_dim, seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["y"]),
    ]
    return _save(
        repo,
        name,
        version,
        nodes,
        [_vi("x", TensorProto.FLOAT, [BATCH, in_dim])],
        [_vi("y", TensorProto.FLOAT, [BATCH, out_dim])],
        [_init(k, v) for k, v in w.items()],
    )


def build_add_sub(repo: Path, name: str = "add_sub", version: int = 1, dim: int = 16) -> Path:
    """Triton's classic add/sub example.

    INPUT0, INPUT1 float32 [batch, dim] -> OUTPUT0 = INPUT0 + INPUT1,
    OUTPUT1 = INPUT0 - INPUT1 (both float32 [batch, dim]).
    """
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _save(
        repo,
        name,
        version,
        nodes,
        [
            _vi("INPUT0", TensorProto.FLOAT, [BATCH, dim]),
            _vi("INPUT1", TensorProto.FLOAT, [BATCH, dim]),
        ],
        [
            _vi("OUTPUT0", TensorProto.FLOAT, [BATCH, dim]),
            _vi("OUTPUT1", TensorProto.FLOAT, [BATCH, dim]),
        ],
    )


def build_mixed_dtypes(repo: Path, name: str = "mixed_dtypes", version: int = 1) -> Path:
    """Several dtypes in one model.

    Inputs: ``f32`` float32 [batch, 4], ``i64`` int64 [batch, 2],
    ``flag`` bool [batch, 1], ``u8`` uint8 [batch, 3].
    Outputs: ``f32_out`` = f32 * 2 (float32), ``i64_out`` = i64 + 1 (int64),
    ``flag_out`` = not flag (bool), ``u8_out`` = u8 (uint8),
    ``f64_out`` = f32 as float64 [batch, 4], ``i32_out`` = i64 as int32 [batch, 2].
    """
    nodes = [
        helper.make_node("Mul", ["f32", "two_f32"], ["f32_out"]),
        helper.make_node("Add", ["i64", "one_i64"], ["i64_out"]),
        helper.make_node("Not", ["flag"], ["flag_out"]),
        helper.make_node("Identity", ["u8"], ["u8_out"]),
        helper.make_node("Cast", ["f32"], ["f64_out"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["i64"], ["i32_out"], to=TensorProto.INT32),
    ]
    return _save(
        repo,
        name,
        version,
        nodes,
        [
            _vi("f32", TensorProto.FLOAT, [BATCH, 4]),
            _vi("i64", TensorProto.INT64, [BATCH, 2]),
            _vi("flag", TensorProto.BOOL, [BATCH, 1]),
            _vi("u8", TensorProto.UINT8, [BATCH, 3]),
        ],
        [
            _vi("f32_out", TensorProto.FLOAT, [BATCH, 4]),
            _vi("i64_out", TensorProto.INT64, [BATCH, 2]),
            _vi("flag_out", TensorProto.BOOL, [BATCH, 1]),
            _vi("u8_out", TensorProto.UINT8, [BATCH, 3]),
            _vi("f64_out", TensorProto.DOUBLE, [BATCH, 4]),
            _vi("i32_out", TensorProto.INT32, [BATCH, 2]),
        ],
        [
            _init("two_f32", np.array(2.0, dtype=np.float32)),
            _init("one_i64", np.array(1, dtype=np.int64)),
        ],
    )


def build_fp16(repo: Path, name: str = "fp16", version: int = 1) -> Path:
    """``x`` float16 [batch, 8] -> ``y`` = x * 2 float16 [batch, 8]."""
    return _save(
        repo,
        name,
        version,
        [helper.make_node("Mul", ["x", "two_f16"], ["y"])],
        [_vi("x", TensorProto.FLOAT16, [BATCH, 8])],
        [_vi("y", TensorProto.FLOAT16, [BATCH, 8])],
        [_init("two_f16", np.array(2.0, dtype=np.float16))],
    )


def build_string(repo: Path, name: str = "string", version: int = 1) -> Path:
    """BYTES model: ``text`` string [batch, 1] -> ``same`` and ``upper``.

    ``same`` = text (string [batch, 1]), ``upper`` = text upper-cased (string
    [batch, 1]).  StringNormalizer only accepts [C] or [1, C], so the input
    is flattened to [C], normalized and reshaped back to the input's shape.
    The locale is
    ``"C"`` (onnxruntime's default, en_US.UTF-8, is often not installed and
    then the session fails to load), so only ASCII letters are upper-cased;
    other characters pass through unchanged.  A batch of 0 rows is rejected
    by StringNormalizer ("Single dimension value must be greater than 0").
    """
    nodes = [
        helper.make_node("Identity", ["text"], ["same"]),
        helper.make_node("Shape", ["text"], ["text_shape"]),
        helper.make_node("Reshape", ["text", "flat_shape"], ["text_flat"]),
        helper.make_node(
            "StringNormalizer",
            ["text_flat"],
            ["upper_flat"],
            case_change_action="UPPER",
            is_case_sensitive=1,
            locale="C",
        ),
        helper.make_node("Reshape", ["upper_flat", "text_shape"], ["upper"]),
    ]
    return _save(
        repo,
        name,
        version,
        nodes,
        [_vi("text", TensorProto.STRING, [BATCH, 1])],
        [
            _vi("same", TensorProto.STRING, [BATCH, 1]),
            _vi("upper", TensorProto.STRING, [BATCH, 1]),
        ],
        [_init("flat_shape", np.array([-1], dtype=np.int64))],
    )


def build_no_batch(repo: Path, name: str = "no_batch", version: int = 1) -> Path:
    """Build a model with fixed shapes and no batch dimension.

    ``x`` float32 [3, 4] -> ``y`` = x @ NO_BATCH_WEIGHT, float32 [3, 2].  A
    gateway should infer max_batch_size 0 from it.
    """
    return _save(
        repo,
        name,
        version,
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_vi("x", TensorProto.FLOAT, [3, 4])],
        [_vi("y", TensorProto.FLOAT, [3, 2])],
        [_init("w", NO_BATCH_WEIGHT)],
    )


def build_scaled(repo: Path, name: str = "scaled", version: int = 1, scale: float = 1.0) -> Path:
    """Scale model: ``x`` float32 [batch, 4] -> ``y`` = x * scale.

    Build several versions with different scales to tell them apart by their
    answers.
    """
    return _save(
        repo,
        name,
        version,
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        [_vi("x", TensorProto.FLOAT, [BATCH, 4])],
        [_vi("y", TensorProto.FLOAT, [BATCH, 4])],
        [_init("scale", np.array(scale, dtype=np.float32))],
    )


def build_identity(repo: Path, name: str = "identity", version: int = 1, input_name: str = "x",
                   width: int = 1) -> Path:
    """``input_name`` float32 [batch, width] -> ``y``, the same (Identity). Any string is a valid
    ONNX name, so ``name`` and ``input_name`` may hold markup, for tests of escaping."""
    return _save(
        repo,
        name,
        version,
        [helper.make_node("Identity", [input_name], ["y"])],
        [_vi(input_name, TensorProto.FLOAT, [BATCH, width])],
        [_vi("y", TensorProto.FLOAT, [BATCH, width])],
    )


def build_int_types(repo: Path, name: str = "int_types", version: int = 1) -> Path:
    """Remaining integer types, each passed through Identity.

    Inputs ``i8`` int8, ``i16`` int16, ``i32`` int32, ``u16`` uint16, ``u32``
    uint32, ``u64`` uint64, each [batch, 2], each copied to ``<input>_out``
    (see INT_TYPES).
    """
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in INT_TYPES]
    return _save(
        repo,
        name,
        version,
        nodes,
        [_vi(n, t, [BATCH, 2]) for n, (_, t) in INT_TYPES.items()],
        [_vi(f"{n}_out", t, [BATCH, 2]) for n, (_, t) in INT_TYPES.items()],
    )


def write_config(model_dir: Path, text: str) -> Path:
    """Write ``<model_dir>/config.pbtxt`` and return its path."""
    path = Path(model_dir) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def corrupt_model(repo: Path, name: str, version: int = 1) -> Path:
    """Write garbage bytes as ``<repo>/<name>/<version>/model.onnx``.

    Returns the model dir ``<repo>/<name>``.
    """
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(GARBAGE)
    return model_dir


def reference_run(model_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model_path`` (a model.onnx file) with onnxruntime on CPU.

    Returns every output by name.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, dict(feeds))
    return dict(zip(names, results, strict=True))


def build_slow(repo: Path, name: str = "slow", version: int = 1, dim: int = 1024, layers: int = 16) -> Path:
    """A compute-heavy chain ``y = tanh(...tanh(x @ W)... @ W)``, ``layers`` deep, one shared
    ``dim x dim`` weight: slow enough at large batches to keep an instance busy."""
    w = (np.random.RandomState(7).randn(dim, dim) / np.sqrt(dim)).astype(np.float32)
    nodes = []
    prev = "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    return _save(
        repo,
        name,
        version,
        nodes,
        [_vi("x", TensorProto.FLOAT, [BATCH, dim])],
        [_vi("y", TensorProto.FLOAT, [BATCH, dim])],
        [_init("w", w)],
    )


def build_rowwise(repo: Path, name: str = "rowwise", version: int = 1) -> Path:
    """``x`` float32 [batch, width] with a dynamic width -> ``y`` = x * 2 and ``s`` = row sums
    [batch, 1]: requests of different widths must never share a tensor."""
    nodes = [
        helper.make_node("Add", ["x", "x"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
    ]
    return _save(
        repo,
        name,
        version,
        nodes,
        [_vi("x", TensorProto.FLOAT, [BATCH, "width"])],
        [_vi("y", TensorProto.FLOAT, [BATCH, "width"]), _vi("s", TensorProto.FLOAT, [BATCH, 1])],
        [_init("axes", np.array([1], dtype=np.int64))],
    )


def build_doubler(repo: Path, name: str = "doubler", dims: Sequence[int] = (2, 2), version: int = 1) -> Path:
    """``x`` float32 [batch, *dims] -> ``y`` = x + x, same shape: for configs that reshape."""
    shape = ["batch", *dims]
    return _save(
        repo,
        name,
        version,
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
