"""Drive the KServe Python SDK's V2 clients: a plan (JSON on stdin) in, results (JSON on stdout) out.

Runs with the python of the venv that ``tests/support/foreign_clients.py`` builds, never in the
gateway's environment. The plan::

    {"transport": "rest" | "grpc", "url": "127.0.0.1:PORT", "calls": {KEY: CALL, ...}}

with CALL one of ``{"op": "live"}``, ``{"op": "ready"}``, ``{"op": "model_ready", "model": M}``,
``{"op": "server_metadata"}``, ``{"op": "model_metadata", "model": M}`` and
``{"op": "infer", "model": M, "inputs": [{"name", "datatype", "shape", "data"}], "binary": BOOL}``
(``data`` flat, BYTES as text; ``binary``: REST binary tensor extension for inputs and outputs,
gRPC ``raw_input_contents`` rather than typed ``contents``). Prints
``{"versions": {...}, "results": {KEY: {"ok": true, "value": ...} or {"ok": false, "error": ..., "code": ...}}}``.

Readiness and inference go through ``InferenceRESTClient`` / ``InferenceGRPCClient``. The SDK has
no metadata calls: over REST the documents are read with httpx (the SDK's own HTTP library) and
validated with the SDK's pydantic models (``kserve.protocol.rest.v2_datamodels``), over gRPC they
are asked of the SDK's generated stub.
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib.metadata import version

import grpc
import httpx
import numpy as np
from google.protobuf.json_format import MessageToDict
from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse

NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_,
         "UINT8": np.uint8, "BYTES": np.object_}


def _array(spec: dict) -> np.ndarray:
    if spec["datatype"] == "BYTES":
        data = [s.encode() for s in spec["data"]]
        return np.array(data, dtype=np.object_).reshape(spec["shape"])
    return np.array(spec["data"], dtype=NUMPY[spec["datatype"]]).reshape(spec["shape"])


def _request(call: dict) -> InferRequest:
    inputs = []
    for spec in call["inputs"]:
        tensor = InferInput(spec["name"], list(spec["shape"]), spec["datatype"])
        tensor.set_data_from_numpy(_array(spec), binary_data=call["binary"])
        inputs.append(tensor)
    parameters = {"binary_data_output": True} if call["binary"] and call.get("transport") == "rest" else None
    return InferRequest(model_name=call["model"], infer_inputs=inputs, request_id="conformance-1",
                        parameters=parameters)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and value != value:
        return "NaN"  # NaN never compares equal: sent as text, the test reads it back with float()
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _response(response) -> dict:
    outputs = {}
    for out in response.outputs:
        array = out.as_numpy()
        outputs[out.name] = {
            "datatype": out.datatype,
            "shape": [int(d) for d in out.shape],
            "dtype": str(array.dtype),
            "data": [_plain(v) for v in array.flatten().tolist()],
        }
    return {"model_name": response.model_name, "model_version": response.model_version, "id": response.id,
            "outputs": outputs}


async def _rest(url: str, call: dict):
    base = f"http://{url}"
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=30))
    try:
        op = call["op"]
        if op == "live":
            return await client.is_server_live(base)
        if op == "ready":
            return await client.is_server_ready(base)
        if op == "model_ready":
            return await client.is_model_ready(base, call["model"])
        if op == "infer":
            return _response(await client.infer(base, _request({**call, "transport": "rest"}), call["model"]))
        path, model = ("/v2", ServerMetadataResponse) if op == "server_metadata" else (
            f"/v2/models/{call['model']}", ModelMetadataResponse)
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.get(base + path)
        reply.raise_for_status()
        return model.model_validate_json(reply.content).model_dump()
    finally:
        await client.close()


async def _grpc(url: str, call: dict):
    client = InferenceGRPCClient(url, timeout=30, retries=0)
    try:
        op = call["op"]
        if op == "live":
            return await client.is_server_live()
        if op == "ready":
            return await client.is_server_ready()
        if op == "model_ready":
            return await client.is_model_ready(call["model"])
        if op == "infer":
            return _response(await client.infer(_request({**call, "transport": "grpc"})))
        stub = client._client_stub  # the SDK's generated GRPCInferenceServiceStub
        if op == "server_metadata":
            reply = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
        else:
            reply = await stub.ModelMetadata(pb.ModelMetadataRequest(name=call["model"]), timeout=30)
        doc = MessageToDict(reply, preserving_proto_field_name=True)
        for tensor in doc.get("inputs", []) + doc.get("outputs", []):
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]  # int64 is text in proto JSON
        return doc
    finally:
        await client.close()


async def _one(plan: dict, call: dict) -> dict:
    try:
        run = _rest if plan["transport"] == "rest" else _grpc
        return {"ok": True, "value": await run(plan["url"], call)}
    except grpc.RpcError as exc:
        return {"ok": False, "code": exc.code().name, "error": exc.details()}
    except httpx.HTTPStatusError as exc:
        return {"ok": False, "code": exc.response.status_code, "error": str(exc)}
    except Exception as exc:
        return {"ok": False, "code": None, "error": f"{type(exc).__name__}: {exc}"}


async def main() -> None:
    plan = json.load(sys.stdin)
    results = {key: await _one(plan, call) for key, call in plan["calls"].items()}
    versions = {name: version(name) for name in ("kserve", "grpcio", "protobuf", "httpx", "numpy")}
    json.dump({"versions": versions, "results": results}, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
