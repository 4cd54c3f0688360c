"""Other projects' V2 clients against a real gateway: the KServe Python SDK and MLServer.

Each tool runs in a venv of its own (``foreign_clients``: their protobuf/grpcio/fastapi pins are
not ours), driven by a script from ``tests/support/foreign_drivers`` that prints JSON:

- KServe: ``InferenceRESTClient`` (JSON and the binary tensor extension) and
  ``InferenceGRPCClient`` (typed ``contents`` and ``raw_input_contents``), their readiness calls,
  and metadata through the SDK's pydantic models (REST) and generated stub (gRPC).
- MLServer: the ``mlserver infer`` CLI over REST (JSON and ``--binary-data``; the CLI refuses
  ``--transport grpc``), and MLServer's gRPC converters and stub (typed contents, and ``use_raw``:
  raw contents beside an empty typed ``contents``), metadata through MLServer's types.

Every answer is checked against what onnxruntime computes for the same model and inputs. One
driver run per (tool, transport) serves all the tests of that pair; a failed call fails only the
test that asserts on it. In CI (``ONNXGATE_REQUIRE_FOREIGN_CLIENTS=1``) a tool that cannot be
installed fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelzoo
from foreign_clients import require_foreign_python, run_driver
from gateway import GatewayProcess

# The first test of each tool may build its venv (pip, a minute or two) inside this limit.
pytestmark = pytest.mark.timeout(1200)

DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(object): "BYTES"}

# client id -> (tool, transport, binary): binary is the REST binary tensor extension (kserve),
# --binary-data (mlserver infer), or raw_input_contents rather than typed contents (gRPC).
CLIENTS = {
    "kserve-rest-json": ("kserve", "rest", False),
    "kserve-rest-binary": ("kserve", "rest", True),
    "kserve-grpc-contents": ("kserve", "grpc", False),
    "kserve-grpc-raw": ("kserve", "grpc", True),
    "mlserver-cli-rest-json": ("mlserver", "rest", False),
    "mlserver-cli-rest-binary": ("mlserver", "rest", True),
    "mlserver-grpc-contents": ("mlserver", "grpc", False),
    "mlserver-grpc-raw": ("mlserver", "grpc", True),
}
PAIRS = sorted({(tool, transport) for tool, transport, _ in CLIENTS.values()})

INT64_VALUES = [[0, -1, 2**53 + 1], [2**62 + 3, -(2**63) + 1, 2**63 - 2]]  # past float64's exact range


@dataclass(frozen=True)
class Case:
    model: str
    inputs: dict[str, np.ndarray]


CASES = {
    "fp32": Case("mlp", {"x": np.random.RandomState(1).randn(3, 16).astype(np.float32)}),
    "int64": Case("int64", {"i64": np.array(INT64_VALUES, dtype=np.int64)}),
    "bytes": Case("string", {"text": np.array([["hello"], ["grüße, wörld"], ["MiXeD 123"]], dtype=object)}),
    # x * inf: inf, -inf and NaN (0 * inf) in the reply, which JSON has no numbers for
    "nonfinite": Case("to_inf", {"x": np.array([[1.0, -1.0, 0.0, 2.5]], dtype=np.float32)}),
}

# name -> (datatype, shape) of every input and output, as model metadata must list them
METADATA = {
    "mlp": {"inputs": {"x": ("FP32", [-1, 16])}, "outputs": {"y": ("FP32", [-1, 10])}},
    "int64": {"inputs": {"i64": ("INT64", [-1, 3])},
              "outputs": {"plus_one": ("INT64", [-1, 3]), "negated": ("INT64", [-1, 3])}},
    "string": {"inputs": {"text": ("BYTES", [-1, 1])},
               "outputs": {"same": ("BYTES", [-1, 1]), "upper": ("BYTES", [-1, 1])}},
}


def _build_int64(repo: Path) -> None:
    """``i64`` int64 [batch, 3] -> ``plus_one`` = i64 + 1 and ``negated`` = -i64, both int64 [batch, 3]."""
    def vi(name):
        return helper.make_tensor_value_info(name, TensorProto.INT64, [modelzoo.BATCH, 3])

    nodes = [helper.make_node("Add", ["i64", "one"], ["plus_one"]), helper.make_node("Neg", ["i64"], ["negated"])]
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), name="one")
    graph = helper.make_graph(nodes, "int64", [vi("i64")], [vi("plus_one"), vi("negated")], initializer=[one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", modelzoo.OPSET)])
    model.ir_version = modelzoo.IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    (repo / "int64" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "int64" / "1" / "model.onnx"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("conformance")
    modelzoo.build_mlp(repo)
    modelzoo.build_string(repo)
    modelzoo.build_scaled(repo, name="to_inf", scale=float("inf"))
    _build_int64(repo)
    return repo


@pytest.fixture(scope="module")
def gw(repo: Path):
    with GatewayProcess(repo) as gw:
        yield gw


def _wire(array: np.ndarray, name: str) -> dict:
    data = [str(v) for v in array.flatten()] if array.dtype == object else array.flatten().tolist()
    return {"name": name, "datatype": DATATYPES[array.dtype], "shape": list(array.shape), "data": data}


def _plan(gw: GatewayProcess, tool: str, transport: str, workdir: Path) -> dict:
    calls: dict[str, dict] = {
        "server_metadata": {"op": "server_metadata"},
        **{f"model_metadata:{m}": {"op": "model_metadata", "model": m} for m in METADATA},
        "unknown": {"op": "infer", "model": "nope", "binary": False, "inputs": [_wire(CASES["fp32"].inputs["x"], "x")]},
    }
    for case_id, case in CASES.items():
        inputs = [_wire(array, name) for name, array in case.inputs.items()]
        for binary in (False, True):
            call = {"op": "infer", "model": case.model, "inputs": inputs, "binary": binary}
            calls[f"infer:{case_id}:{binary}"] = call
    if tool == "kserve":
        calls |= {"live": {"op": "live"}, "ready": {"op": "ready"},
                  "model_ready:mlp": {"op": "model_ready", "model": "mlp"},
                  "model_ready:nope": {"op": "model_ready", "model": "nope"}}
    url = gw.http_url if transport == "rest" else gw.grpc_url
    return {"transport": transport, "url": url, "workdir": str(workdir), "calls": calls}


@pytest.fixture(scope="module")
def foreign(gw, tmp_path_factory):
    """``foreign(tool, transport)``: that pair's driver output, run once per module."""
    done: dict[tuple[str, str], dict | Exception] = {}

    def run(tool: str, transport: str) -> dict:
        python = require_foreign_python(tool)  # skip or fail (CI) when the tool can't be installed
        if (tool, transport) not in done:
            workdir = tmp_path_factory.mktemp(f"{tool}-{transport}")
            try:
                done[tool, transport] = run_driver(python, f"{tool}_driver.py", _plan(gw, tool, transport, workdir))
            except (AssertionError, OSError, ValueError) as exc:
                done[tool, transport] = exc
        outcome = done[tool, transport]
        if isinstance(outcome, Exception):
            raise AssertionError(f"the {tool} driver ({transport}) did not run") from outcome
        return outcome

    return run


def _result(foreign, tool: str, transport: str, key: str) -> dict:
    return foreign(tool, transport)["results"][key]


def _value(foreign, tool: str, transport: str, key: str):
    result = _result(foreign, tool, transport, key)
    assert result["ok"], f"{tool} over {transport}, {key}: {result.get('code')}: {result['error']}"
    return result["value"]


def _reference(repo: Path, case: Case) -> dict[str, np.ndarray]:
    return modelzoo.reference_run(repo / case.model / "1" / "model.onnx", case.inputs)


@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("client", list(CLIENTS))
def test_infer_matches_onnxruntime(foreign, repo, client, case_id):
    tool, transport, binary = CLIENTS[client]
    case = CASES[case_id]
    reply = _value(foreign, tool, transport, f"infer:{case_id}:{binary}")
    assert reply["model_name"] == case.model
    if not (tool == "mlserver" and transport == "rest"):  # the CLI re-ids what it batches
        assert reply["id"] == "conformance-1"
    expected = _reference(repo, case)
    assert sorted(reply["outputs"]) == sorted(expected)
    for name, ref in expected.items():
        out = reply["outputs"][name]
        assert (out["datatype"], out["shape"]) == (DATATYPES[ref.dtype], list(ref.shape)), name
        if ref.dtype == object:
            assert out["data"] == [str(v) for v in ref.flatten()], name
        elif ref.dtype == np.int64:
            assert out["data"] == ref.flatten().tolist(), name
        else:
            want = ref.flatten().astype(np.float64)
            if tool == "mlserver" and transport == "rest":
                want[~np.isfinite(want)] = np.nan  # the CLI's output file (pydantic JSON) writes them as null
            got = np.array(out["data"], dtype=np.float64)  # "NaN"/"Infinity" text from the drivers
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{client} {name}")


@pytest.mark.parametrize(("tool", "transport"), PAIRS)
def test_server_metadata(foreign, tool, transport):
    meta = _value(foreign, tool, transport, "server_metadata")  # validated by the tool's own types
    assert meta["name"] and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("model", list(METADATA))
@pytest.mark.parametrize(("tool", "transport"), PAIRS)
def test_model_metadata(foreign, tool, transport, model):
    meta = _value(foreign, tool, transport, f"model_metadata:{model}")
    assert meta["name"] == model
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == ["1"]
    for side in ("inputs", "outputs"):
        got = {t["name"]: (t["datatype"], list(t["shape"])) for t in meta[side]}
        assert got == METADATA[model][side], side


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_kserve_health_and_readiness(foreign, transport):
    assert _value(foreign, "kserve", transport, "live") is True
    assert _value(foreign, "kserve", transport, "ready") is True
    assert _value(foreign, "kserve", transport, "model_ready:mlp") is True
    unknown = _result(foreign, "kserve", transport, "model_ready:nope")
    # REST: the SDK reads a non-2xx status as "not ready"; gRPC: ready false, or NOT_FOUND raised
    assert unknown == {"ok": True, "value": False} or unknown.get("code") == "NOT_FOUND", unknown


@pytest.mark.parametrize(("tool", "transport"), PAIRS)
def test_unknown_model_error(foreign, tool, transport):
    result = _result(foreign, tool, transport, "unknown")
    assert not result["ok"], result
    if not (tool == "mlserver" and transport == "rest"):  # the CLI writes only the message
        assert result["code"] in (404, "NOT_FOUND"), result
    # Triton's wording, which clients and their users grep for
    assert "Request for unknown model" in result["error"] and "nope" in result["error"], result["error"]
