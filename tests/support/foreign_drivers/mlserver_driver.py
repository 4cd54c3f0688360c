"""Drive MLServer's V2 client side: a plan (JSON on stdin) in, results (JSON on stdout) out.

Runs with the python of the venv that ``tests/support/foreign_clients.py`` builds, never in the
gateway's environment. The plan::

    {"transport": "rest" | "grpc", "url": "127.0.0.1:PORT", "workdir": DIR, "calls": {KEY: CALL, ...}}

with CALL one of ``{"op": "server_metadata"}``, ``{"op": "model_metadata", "model": M}`` and
``{"op": "infer", "model": M, "inputs": [{"name", "datatype", "shape", "data"}], "binary": BOOL}``
(``data`` flat, BYTES as text). Prints
``{"versions": {...}, "results": {KEY: {"ok": true, "value": ...} or {"ok": false, "error": ..., "code": ...}}}``.

- REST infer runs the ``mlserver infer`` CLI (tritonclient's aio HTTP client underneath; ``binary``
  is its ``--binary-data``) on a one-line input file in ``workdir`` and reads its output file with
  MLServer's own types and codecs. The CLI refuses ``--transport grpc`` ("not yet supported").
- gRPC infer is what MLServer's gRPC side sends and reads: ``ModelInferRequestConverter.from_types``
  (``binary``: ``use_raw=True``, raw_input_contents beside an empty typed ``contents``) on MLServer's
  generated stub, the reply read back by ``ModelInferResponseConverter.to_types``.
- Metadata: over REST the documents are validated with MLServer's pydantic types; over gRPC they
  go through MLServer's converters to the same types.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import grpc
from mlserver import types
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.grpc import converters
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceStub

CLI = Path(sys.executable).with_name("mlserver")


def _plain(value):
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _outputs(response: types.InferenceResponse) -> dict:
    outputs = {}
    for out in response.outputs:
        if out.datatype == "BYTES":
            data = [s.decode() if isinstance(s, bytes) else s for s in StringCodec.decode_output(out)]
        else:
            data = [_plain(v) for v in NumpyCodec.decode_output(out).flatten().tolist()]
        datatype = getattr(out.datatype, "value", out.datatype)  # an enum or its value, as pydantic left it
        outputs[out.name] = {"datatype": datatype, "shape": list(out.shape), "data": data}
    return {"model_name": response.model_name, "model_version": response.model_version, "id": response.id,
            "outputs": outputs}


def _request(call: dict) -> types.InferenceRequest:
    inputs = [types.RequestInput(name=t["name"], shape=t["shape"], datatype=t["datatype"],
                                 data=[s.encode() for s in t["data"]] if t["datatype"] == "BYTES" else t["data"])
              for t in call["inputs"]]
    return types.InferenceRequest(id="conformance-1", inputs=inputs)


def _cli_infer(url: str, workdir: Path, key: str, call: dict) -> dict:
    source, sink = workdir / f"{key}.in.json", workdir / f"{key}.out.json"
    source.write_text(_request(call).model_dump_json(exclude_none=True) + "\n")
    cmd = [str(CLI), "infer", "-u", url, "-m", call["model"], "-i", str(source), "-o", str(sink),
           "--transport", "rest", "-w", "1", "-r", "1", *(["-b"] if call["binary"] else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    lines = sink.read_text().splitlines() if sink.exists() else []
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"mlserver infer exited {proc.returncode}, {len(lines)} lines:\n{proc.stderr[-3000:]}")
    doc = json.loads(lines[0])
    if "error" in doc:  # the CLI writes a failed request as an error line and exits 0
        raise RuntimeError(f"mlserver infer: {doc['error']}\n{proc.stderr[-3000:]}")
    return _outputs(types.InferenceResponse.model_validate(doc))


def _rest(plan: dict, key: str, call: dict):
    if call["op"] == "infer":
        return _cli_infer(plan["url"], Path(plan["workdir"]), key, call)
    path, model = ("/v2", types.MetadataServerResponse) if call["op"] == "server_metadata" else (
        f"/v2/models/{call['model']}", types.MetadataModelResponse)
    with urllib.request.urlopen(f"http://{plan['url']}{path}", timeout=30) as reply:
        return model.model_validate_json(reply.read()).model_dump(mode="json", exclude_none=True)


def _grpc(plan: dict, call: dict):
    with grpc.insecure_channel(plan["url"]) as channel:
        stub = GRPCInferenceServiceStub(channel)
        if call["op"] == "server_metadata":
            reply = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
            return converters.ServerMetadataResponseConverter.to_types(reply).model_dump(mode="json")
        if call["op"] == "model_metadata":
            reply = stub.ModelMetadata(pb.ModelMetadataRequest(name=call["model"]), timeout=30)
            doc = converters.ModelMetadataResponseConverter.to_types(reply)
            return doc.model_dump(mode="json", exclude_none=True)
        request = converters.ModelInferRequestConverter.from_types(
            _request(call), model_name=call["model"], use_raw=call["binary"])
        reply = stub.ModelInfer(request, timeout=30)
        return _outputs(converters.ModelInferResponseConverter.to_types(reply))


def _one(plan: dict, key: str, call: dict) -> dict:
    try:
        value = _rest(plan, key, call) if plan["transport"] == "rest" else _grpc(plan, call)
        return {"ok": True, "value": value}
    except grpc.RpcError as exc:
        return {"ok": False, "code": exc.code().name, "error": exc.details()}
    except urllib.error.HTTPError as exc:
        return {"ok": False, "code": exc.code, "error": exc.read().decode("utf-8", "replace")}
    except Exception as exc:
        return {"ok": False, "code": None, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    plan = json.load(sys.stdin)
    results = {key: _one(plan, key, call) for key, call in plan["calls"].items()}
    versions = {name: version(name) for name in ("mlserver", "tritonclient", "grpcio", "protobuf", "numpy")}
    json.dump({"versions": versions, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
