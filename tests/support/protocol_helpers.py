"""Helpers shared by the protocol tests: one infer call per client flavour, inputs for every
zoo model, exact comparisons with ONNX Runtime, and an extra repository for special models.

Every call goes through an unmodified ``tritonclient`` (grpc, http, and their aio variants).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from onnx import TensorProto, helper
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

import modelzoo

# "http" sends and asks for binary tensors (the client's default); "http_json" sends JSON
# ``data`` and asks for JSON outputs.
SYNC_TRANSPORTS = ("grpc", "http", "http_json")
AIO_TRANSPORTS = ("grpc_aio", "http_aio")
TRANSPORTS = SYNC_TRANSPORTS + AIO_TRANSPORTS

# Every model of the session ``zoo_repo`` that serves inference (``broken`` does not).
ZOO_MODELS = ("mlp", "add_sub", "mixed_dtypes", "fp16", "string", "no_batch", "int_types", "scaled")

BIG_ELEMENTS = 1 << 20  # "big" model: Identity on float32 [batch, 1048576] (4 MiB per row)

STRINGS = ("hello", "Wörld ✓", "", "MiXeD 123 abc", "x" * 300, "tab\tand\nnewline")


@dataclass
class Answer:
    """One inference answer, whatever client produced it; ``outputs`` keeps response order."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    id: str


# -- inputs and references ----------------------------------------------------------------


def zoo_feeds(model: str, rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a zoo model; ``rows`` is the batch size (``no_batch`` has fixed shapes)."""
    rng = np.random.RandomState(seed)
    if model == "mlp":
        return {"x": rng.randn(rows, 16).astype(np.float32)}
    if model == "add_sub":
        return {"INPUT0": rng.randn(rows, 16).astype(np.float32), "INPUT1": rng.randn(rows, 16).astype(np.float32)}
    if model == "mixed_dtypes":
        i64 = rng.randint(-(2**40), 2**40, size=(rows, 2)).astype(np.int64)
        i64[0] = [np.iinfo(np.int64).max - 1, np.iinfo(np.int64).min]
        return {
            "f32": rng.randn(rows, 4).astype(np.float32),
            "i64": i64,
            "flag": rng.randint(0, 2, size=(rows, 1)).astype(bool),
            "u8": rng.randint(0, 256, size=(rows, 3)).astype(np.uint8),
        }
    if model == "fp16":
        return {"x": (rng.randn(rows, 8) * 100).astype(np.float16)}
    if model == "string":
        text = np.array([STRINGS[(seed + i) % len(STRINGS)] for i in range(rows)], dtype=object)
        return {"text": text.reshape(rows, 1)}
    if model == "no_batch":
        return {"x": rng.randn(3, 4).astype(np.float32)}
    if model == "int_types":
        feeds = {}
        for name, (dtype, _) in modelzoo.INT_TYPES.items():
            info = np.iinfo(dtype)
            arr = np.zeros((rows, 2), dtype=dtype)
            arr[0] = [info.min, info.max]
            if rows > 1:
                arr[1:] = rng.randint(0, min(int(info.max), 2**31 - 1), size=(rows - 1, 2)).astype(dtype)
            feeds[name] = arr
        return feeds
    if model in ("scaled", "counted_scaled"):
        return {"x": rng.randn(rows, 4).astype(np.float32)}
    raise ValueError(f"no feeds for model {model!r}")


def model_file(repo: Path, model: str, version: int | str = 1) -> Path:
    return Path(repo) / model / str(version) / "model.onnx"


def reference(repo: Path, model: str, feeds: Mapping[str, np.ndarray], version: int | str = 1) -> dict[str, np.ndarray]:
    """ONNX Runtime's own answer for the same model file."""
    return modelzoo.reference_run(model_file(repo, model, version), feeds)


def as_bytes_array(arr: np.ndarray) -> np.ndarray:
    """An object array of str/bytes as an object array of UTF-8 bytes."""
    flat = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.ravel().tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(arr.shape)


def assert_tensor_equal(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Same shape, same dtype and the same values (BYTES compared as UTF-8 bytes)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    if expected.dtype == object:
        assert actual.dtype == object, f"{what}: dtype {actual.dtype}, expected BYTES (object)"
        assert as_bytes_array(actual).tolist() == as_bytes_array(expected).tolist(), what
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    np.testing.assert_array_equal(actual, expected, err_msg=what)


def assert_answer_matches(answer: Answer, expected: Mapping[str, np.ndarray]) -> None:
    assert sorted(answer.outputs) == sorted(expected), f"outputs {list(answer.outputs)} != {list(expected)}"
    for name, arr in expected.items():
        assert_tensor_equal(answer.outputs[name], arr, f"output '{name}'")


# -- one infer call per client flavour ----------------------------------------------------


def _module(transport: str):
    return {
        "grpc": grpcclient,
        "grpc_aio": grpcclient,
        "http": httpclient,
        "http_json": httpclient,
        "http_aio": httpclient,
    }[transport]


def make_inputs(transport: str, feeds: Mapping[str, np.ndarray]) -> list:
    mod = _module(transport)
    inputs = []
    for name, arr in feeds.items():
        item = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        if transport == "http_json":
            item.set_data_from_numpy(arr, binary_data=False)
        else:
            item.set_data_from_numpy(arr)
        inputs.append(item)
    return inputs


def make_outputs(transport: str, names: Sequence[str] | None, class_count: int = 0) -> list | None:
    if names is None:
        return None
    if transport.startswith("grpc"):
        return [grpcclient.InferRequestedOutput(n, class_count=class_count) for n in names]
    binary = transport != "http_json"
    return [httpclient.InferRequestedOutput(n, binary_data=binary, class_count=class_count) for n in names]


def _answer(result) -> Answer:
    response = result.get_response()
    if isinstance(response, dict):  # HTTP
        names = [o["name"] for o in response["outputs"]]
        return Answer(
            {n: result.as_numpy(n) for n in names},
            response["model_name"],
            response.get("model_version", ""),
            response.get("id", ""),
        )
    names = [o.name for o in response.outputs]
    return Answer({n: result.as_numpy(n) for n in names}, response.model_name, response.model_version, response.id)


def client_for(transport: str, gw):
    """A sync client for ``transport`` ("grpc" or an "http" flavour)."""
    if transport.startswith("grpc"):
        return grpcclient.InferenceServerClient(gw.grpc_url)
    return httpclient.InferenceServerClient(gw.http_url)


def infer(
    transport: str,
    gw,
    model: str,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    version: str = "",
    request_id: str = "",
    class_count: int = 0,
) -> Answer:
    """One inference of ``model`` through the client named by ``transport``."""
    inputs = make_inputs(transport, feeds)
    requested = make_outputs(transport, outputs, class_count)
    if transport in AIO_TRANSPORTS:
        return asyncio.run(_infer_aio(transport, gw, model, inputs, requested, version, request_id))
    client = client_for(transport, gw)
    try:
        result = client.infer(model, inputs, model_version=version, outputs=requested, request_id=request_id)
    finally:
        client.close()
    return _answer(result)


async def _infer_aio(transport, gw, model, inputs, requested, version, request_id) -> Answer:
    if transport == "grpc_aio":
        client = grpcaio.InferenceServerClient(gw.grpc_url)
    else:
        client = httpaio.InferenceServerClient(gw.http_url)
    try:
        result = await client.infer(model, inputs, model_version=version, outputs=requested, request_id=request_id)
    finally:
        await client.close()
    return _answer(result)


# -- plain HTTP -----------------------------------------------------------------------------


def http_request(gw, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers with lower-case names, body) of one plain urllib request."""
    req = urllib.request.Request(f"http://{gw.http_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def json_infer_body(feeds: Mapping[str, np.ndarray], flat: bool = False, **fields) -> bytes:
    """A plain-JSON infer body (nested ``data``, or flat when ``flat``), as curl would send it."""
    inputs = [
        {
            "name": name,
            "shape": list(arr.shape),
            "datatype": np_to_triton_dtype(arr.dtype),
            "data": arr.ravel().tolist() if flat else arr.tolist(),
        }
        for name, arr in feeds.items()
    ]
    return json.dumps({**fields, "inputs": inputs}).encode()


def json_outputs(doc: dict) -> dict[str, np.ndarray]:
    """The JSON ``data`` outputs of an infer reply as arrays of their datatype and shape."""
    return {
        o["name"]: np.array(o["data"], dtype=triton_to_np_dtype(o["datatype"])).reshape(o["shape"])
        for o in doc["outputs"]
    }


def binary_infer_body(x: np.ndarray, input_name: str = "x", output_name: str = "y") -> tuple[bytes, int]:
    """A binary-extension infer body for one FP32 input, and its JSON header's length."""
    shape, size = list(x.shape), x.nbytes
    doc = {
        "inputs": [{"name": input_name, "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": size}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }
    header = json.dumps(doc).encode()
    return header + np.ascontiguousarray(x, dtype="<f4").tobytes(), len(header)


def split_binary_reply(headers: dict, reply: bytes) -> tuple[dict, bytes]:
    """The JSON header and the binary tail of an infer reply."""
    n = int(headers["inference-header-content-length"])
    return json.loads(reply[:n]), reply[n:]


# -- classification -----------------------------------------------------------------------


def assert_classification(labels: np.ndarray, scores: np.ndarray, k: int, batched: bool = True) -> None:
    """``labels`` (BYTES "value:index") are the top-k of each row of ``scores``, highest first.

    Shape [rows, k] when batched, [k] over the whole tensor otherwise. Values print like
    Triton's ``std::to_string``: integers as integers, floats with six decimals.
    """
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    k = min(k, rows.shape[1])
    expected_shape = (rows.shape[0], k) if batched else (k,)
    assert labels.shape == expected_shape, f"classification shape {labels.shape}, expected {expected_shape}"
    labels = labels.reshape(rows.shape[0], k)
    for r in range(rows.shape[0]):
        values = rows[r].tolist()  # Python numbers: no overflow when ordering
        order = sorted(range(len(values)), key=lambda i: -values[i])
        for j in range(k):
            text = labels[r, j].decode() if isinstance(labels[r, j], bytes) else str(labels[r, j])
            value, index = text.split(":")[:2]
            want = values[order[j]]
            assert int(index) == order[j], f"row {r} rank {j}: got '{text}', expected class {order[j]} ({want})"
            if isinstance(want, int):
                assert value == str(want), f"row {r} rank {j}: got '{text}', expected '{want}:{order[j]}'"
            else:
                assert abs(float(value) - want) <= 1e-6 * max(1.0, abs(want)), f"row {r} rank {j}: '{text}' vs {want}"


# -- statistics -----------------------------------------------------------------------------

INFER_STAT_KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def stats_entry(stats: dict, name: str, version: str) -> dict:
    """The entry of ``name``/``version`` in a statistics reply (HTTP JSON or gRPC ``as_json``).

    gRPC ``as_json`` writes uint64 as strings and leaves out zero fields; the entry is
    normalized to look like HTTP's: every count an int, every field present.
    """
    found = [s for s in stats["model_stats"] if s["name"] == name and s["version"] == version]
    assert len(found) == 1, f"expected one stats entry for {name} v{version}, got {stats['model_stats']}"
    entry = {k: (v if k in ("name", "version") else _ints(v)) for k, v in found[0].items()}
    for key in ("last_inference", "inference_count", "execution_count"):
        entry.setdefault(key, 0)
    entry.setdefault("batch_stats", [])
    for key in (*INFER_STAT_KEYS, "cache_hit", "cache_miss"):
        entry.setdefault("inference_stats", {}).setdefault(key, {"count": 0, "ns": 0})
    for b in entry["batch_stats"]:
        for key in ("compute_input", "compute_infer", "compute_output"):
            b.setdefault(key, {"count": 0, "ns": 0})
    return entry


def _ints(value):
    if isinstance(value, dict):
        out = {k: _ints(v) for k, v in value.items()}
        if "count" in out or "ns" in out or not value:
            out.setdefault("count", 0)
            out.setdefault("ns", 0)
        return out
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def batch_histogram(entry: dict) -> dict[int, int]:
    """batch_size -> executions, from ``batch_stats``."""
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry.get("batch_stats", [])}


def assert_stats_delta(before: dict, after: dict, rows: Sequence[int]) -> None:
    """``after`` is ``before`` plus exactly one sequential, successful request per ``rows`` entry.

    Both are normalized entries (see :func:`stats_entry`).
    """
    n, total = len(rows), sum(rows)

    def count(entry, key):
        return entry["inference_stats"][key]["count"]

    def ns(entry, key):
        return entry["inference_stats"][key]["ns"]

    assert after["version"].isdigit(), f"version must be a numeric string, got {after['version']!r}"
    assert count(after, "success") - count(before, "success") == n
    assert count(after, "fail") == count(before, "fail")
    assert after["inference_count"] - before["inference_count"] == total, "inference_count counts rows"
    # Sequential requests cannot share an execution.
    assert after["execution_count"] - before["execution_count"] == n
    hist_before, hist_after = batch_histogram(before), batch_histogram(after)
    delta = {b: c - hist_before.get(b, 0) for b, c in hist_after.items() if c != hist_before.get(b, 0)}
    expected: dict[int, int] = {}
    for r in rows:
        expected[r] = expected.get(r, 0) + 1
    assert delta == expected, f"batch_stats grew by {delta}, expected {expected} (batch_size = rows)"
    assert sum(hist_after.values()) == after["execution_count"], "sum of batch_stats counts == execution_count"
    assert sum(b * c for b, c in hist_after.items()) == after["inference_count"], "rows executed == rows inferred"
    for b in after["batch_stats"]:
        c = b["compute_infer"]["count"]
        assert b["compute_input"]["count"] == c and b["compute_output"]["count"] == c
        assert b["compute_infer"]["ns"] > 0
    assert count(after, "queue") == count(after, "success"), "queue.count == success.count"
    for key in ("compute_input", "compute_infer", "compute_output"):
        assert count(after, key) == count(after, "success"), f"{key}.count == success.count"
    for key in ("success", "queue", "compute_infer"):
        assert ns(after, key) > ns(before, key), f"{key}.ns did not grow: {ns(before, key)} -> {ns(after, key)}"
    for key in ("compute_input", "compute_output"):  # sub-microsecond phases: only ask for a total
        assert ns(after, key) >= ns(before, key) and ns(after, key) > 0, f"{key}.ns is {ns(after, key)}"
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 1_600_000_000_000


# -- extra repository ---------------------------------------------------------------------


def build_identity(repo: Path, name: str, elements: int) -> Path:
    """Identity on float32 [batch, elements]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [modelzoo.BATCH, elements])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [modelzoo.BATCH, elements])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", modelzoo.OPSET)])
    model.ir_version = modelzoo.IR_VERSION
    onnx.checker.check_model(model)
    path = Path(repo) / name / "1"
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    return path.parent


def build_extra_repo(repo: Path) -> Path:
    """Models the session zoo lacks: a name with a space, a big Identity, and statistics-only models."""
    modelzoo.build_mlp(repo, name="my model")
    # max_batch_size 8: the default warm-up runs max_batch_size rows (4 MiB each here).
    modelzoo.write_config(build_identity(repo, "big", BIG_ELEMENTS), "max_batch_size: 8\n")
    modelzoo.build_add_sub(repo, name="counted")  # statistics tests only
    for version, scale in ((1, 1.0), (2, 2.0)):
        modelzoo.build_scaled(repo, name="counted_scaled", version=version, scale=scale)
    modelzoo.write_config(repo / "counted_scaled", "version_policy: { all { } }\n")
    modelzoo.corrupt_model(repo, "broken")
    return repo
