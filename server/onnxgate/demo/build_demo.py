"""Build the bundled demo model repository, deterministically.

    python server/onnxgate/demo/build_demo.py [--out DIR]

Writes a Triton-style model repository (default: ``models/`` next to this
file)::

    iris_classifier/1/model.onnx   scikit-learn LogisticRegression on iris
                                   (no config.pbtxt: the gateway completes it
                                   from the graph)
    mlp/config.pbtxt               max_batch_size 64, latest 2 versions,
                                   dynamic batching
    mlp/1/model.onnx               x float32 [batch, 16] -> y float32 [batch, 10]
    mlp/2/model.onnx               same graph, different weights

Running it twice gives byte-identical files: seeds are fixed, the producer
fields are constant and nothing records a time.  Each model is then loaded and
run once with onnxruntime.

Needs numpy, onnx, onnxruntime, scikit-learn and skl2onnx (build-time only;
the gateway itself does not need scikit-learn or skl2onnx).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OUT = Path(__file__).resolve().parent / "models"

PRODUCER_NAME = "onnxgate-demo"
PRODUCER_VERSION = "1"
OPSET = 17
ML_OPSET = 3
IR_VERSION = 8  # goes with opset 17 / ai.onnx.ml 3; onnxruntime 1.32 accepts it

MLP_IN, MLP_HIDDEN, MLP_OUT = 16, 64, 10
MLP_SEEDS = {1: 1, 2: 2}  # version -> numpy RandomState seed

MLP_CONFIG = """\
name: "mlp"
max_batch_size: 64
version_policy: { latest { num_versions: 2 } }
dynamic_batching { max_queue_delay_microseconds: 500 }
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 16 ]
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
"""


def _finish(model: onnx.ModelProto, graph_name: str, doc: str) -> onnx.ModelProto:
    """Pin every metadata field that could vary between runs or tool versions."""
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER_NAME
    model.producer_version = PRODUCER_VERSION
    model.domain = "onnxgate.demo"
    model.model_version = 1
    model.doc_string = doc
    model.graph.name = graph_name
    del model.metadata_props[:]
    # skl2onnx can list the default domain twice; keep one entry per domain.
    opsets: dict[str, int] = {}
    for imp in model.opset_import:
        opsets[imp.domain] = max(imp.version, opsets.get(imp.domain, 0))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    onnx.checker.check_model(model, full_check=True)
    return model


def build_iris() -> onnx.ModelProto:
    """Train LogisticRegression on iris and convert it to ONNX.

    No ZipMap: outputs are plain tensors, ``label`` int64 [N] and
    ``probabilities`` float32 [N, 3]; input ``input`` float32 [N, 4].
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris()
    features = iris.data.astype(np.float32)
    clf = LogisticRegression(max_iter=1000, random_state=0)
    clf.fit(features, iris.target)
    model = convert_sklearn(
        clf,
        name="iris_classifier",
        initial_types=[("input", FloatTensorType([None, 4]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options={"zipmap": False},
    )
    return _finish(
        model,
        "iris_classifier",
        "Iris species classifier (LogisticRegression). Input: 4 float32 "
        "features (sepal length, sepal width, petal length, petal width, cm). "
        "Outputs: label int64 (0 setosa, 1 versicolor, 2 virginica), "
        "probabilities float32 [N, 3].",
    )


def build_mlp(seed: int) -> onnx.ModelProto:
    """MLP: x [batch, 16] -> Gemm 16x64 -> Relu -> Gemm 64x10 -> y [batch, 10]."""
    rng = np.random.RandomState(seed)
    weights = {
        "w1": (rng.randn(MLP_IN, MLP_HIDDEN) / np.sqrt(MLP_IN)).astype(np.float32),
        "b1": (rng.randn(MLP_HIDDEN) * 0.1).astype(np.float32),
        "w2": (rng.randn(MLP_HIDDEN, MLP_OUT) / np.sqrt(MLP_HIDDEN)).astype(np.float32),
        "b2": (rng.randn(MLP_OUT) * 0.1).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["hidden"]),
            helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
            helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", MLP_OUT])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return _finish(model, "mlp", f"Random-weight MLP 16-64-10 (numpy RandomState seed {seed}).")


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _save_model(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build(out: Path) -> list[Path]:
    """Write the demo repository under ``out``; return the files written."""
    written = [_save_model(build_iris(), out / "iris_classifier" / "1" / "model.onnx")]
    for version, seed in MLP_SEEDS.items():
        written.append(_save_model(build_mlp(seed), out / "mlp" / str(version) / "model.onnx"))
    written.append(_write_bytes(out / "mlp" / "config.pbtxt", MLP_CONFIG.encode("utf-8")))
    return written


def smoke_test(out: Path) -> None:
    """Load and run every model once with onnxruntime."""
    import onnxruntime as ort

    def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))

    iris_in = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    res = run(out / "iris_classifier" / "1" / "model.onnx", {"input": iris_in})
    label, probs = res["label"], res["probabilities"]
    assert label.dtype == np.int64 and label.shape == (2,), label
    assert probs.dtype == np.float32 and probs.shape == (2, 3), probs
    assert label.tolist() == [0, 2], label
    shown = [[f"{p:.3f}" for p in row] for row in probs.tolist()]
    print(f"  iris_classifier/1: label={label.tolist()} probabilities={shown}")

    x = np.random.RandomState(0).randn(2, MLP_IN).astype(np.float32)
    for version in MLP_SEEDS:
        y = run(out / "mlp" / str(version) / "model.onnx", {"x": x})["y"]
        assert y.dtype == np.float32 and y.shape == (2, MLP_OUT), y
        shown = [f"{v:.4f}" for v in y[0, :3].tolist()]
        print(f"  mlp/{version}: y[0, :3]={shown}")


def main(argv: list[str] | None = None) -> int:
    """Build the demo repository, print what was written and smoke-test it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()

    written = build(out)
    print(f"wrote demo model repository to {out}:")
    for path in written:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        print(f"  {path.relative_to(out)}  {len(data)} bytes  sha256 {digest}")
    print("onnxruntime check:")
    smoke_test(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
