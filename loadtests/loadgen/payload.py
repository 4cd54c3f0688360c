"""Load generator: what to send -- input specs, the target, and the pre-encoded requests."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass(frozen=True)
class TensorSpec:
    """One input: V2 datatype and per-row dims (without the batch dim when the model batches)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """``NAME:DATATYPE:DIMS`` with DIMS like ``16`` or ``3x224x224`` (empty = scalar per row)."""
        try:
            name, datatype, dims = text.rsplit(":", 2)
        except ValueError:
            raise ValueError(f"input spec {text!r} is not NAME:DATATYPE:DIMS (e.g. x:FP32:16)") from None
        datatype = datatype.upper()
        if datatype not in _NUMPY:
            raise ValueError(f"input spec {text!r}: datatype must be one of {sorted(_NUMPY)}")
        parts = [p for p in dims.replace(",", "x").split("x") if p.strip()]
        return cls(name, datatype, tuple(int(p) for p in parts))


@dataclass
class Target:
    """The server, model and request to send."""

    url: str
    model: str
    model_version: str = ""
    inputs: list[TensorSpec] = field(default_factory=list)  # empty: ask the server's model metadata
    outputs: list[str] = field(default_factory=list)  # empty: all outputs
    batch_size: int = 1  # rows per request
    batched: bool = True  # the model has a batch dim (first dim of each input)
    grpc_mode: str = "unary"  # "unary" | "stream"
    http_client: str = "raw"  # "raw" | "aiohttp"
    loop: str = "uvloop"  # event loop of the workers: "uvloop" | "asyncio"
    connections: int = 1  # per process: gRPC channels (unary) or streams (stream); HTTP pre-opened
    timeout_s: float = 30.0  # per request
    validate: bool = False  # parse every reply and check its outputs

    @property
    def transport(self) -> str:
        scheme = urlsplit(self.url).scheme.lower()
        if scheme not in ("grpc", "http"):
            raise ValueError(f"url {self.url!r}: scheme must be grpc:// or http://")
        return scheme

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"url {self.url!r} needs a host and a port")
        return parts.hostname, parts.port


@dataclass(frozen=True)
class Payload:
    """Pre-encoded requests; built once in the parent, shipped to every worker."""

    rows: int
    outputs: tuple[str, ...]
    grpc_request: bytes
    http_request: bytes  # request line + headers + body
    http_path: str
    http_headers: tuple[tuple[str, str], ...]
    http_body: bytes


def _random_array(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 8, shape).astype(dtype)


def build_payload(target: Target, inputs: Sequence[TensorSpec]) -> Payload:
    """Encode one request for both transports (random data, fixed seed)."""
    from onnxgate_client.pb import grpc_service_pb2 as pb

    rng = np.random.default_rng(1234)
    rows = target.batch_size if target.batched else 1
    req = pb.ModelInferRequest(model_name=target.model, model_version=target.model_version)
    header_inputs = []
    raws: list[bytes] = []
    for spec in inputs:
        shape = [target.batch_size, *spec.dims] if target.batched else list(spec.dims)
        raw = _random_array(spec.datatype, shape, rng).tobytes()
        req.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        req.raw_input_contents.append(raw)
        raws.append(raw)
        header_inputs.append(
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "parameters": {"binary_data_size": len(raw)}}
        )
    for name in target.outputs:
        req.outputs.add(name=name)
    doc: dict[str, Any] = {"inputs": header_inputs}
    if target.outputs:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in target.outputs]
    else:
        doc["parameters"] = {"binary_data_output": True}
    header = json.dumps(doc, separators=(",", ":")).encode()
    body = header + b"".join(raws)
    path = f"/v2/models/{quote(target.model, safe='')}"
    if target.model_version:
        path += f"/versions/{quote(target.model_version, safe='')}"
    path += "/infer"
    host, port = target.address
    headers = (
        ("Content-Type", "application/octet-stream"),
        ("Inference-Header-Content-Length", str(len(header))),
    )
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return Payload(
        rows=rows,
        outputs=tuple(target.outputs),
        grpc_request=req.SerializeToString(),
        http_request=head.encode("latin-1") + body,
        http_path=path,
        http_headers=headers,
        http_body=body,
    )


def resolve_inputs(target: Target) -> list[TensorSpec]:
    """The target's inputs, from ``target.inputs`` or else from the server's model metadata."""
    if target.inputs:
        return list(target.inputs)
    if target.transport == "http":
        host, port = target.address
        path = f"/v2/models/{quote(target.model, safe='')}"
        if target.model_version:
            path += f"/versions/{quote(target.model_version, safe='')}"
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as reply:
            meta = json.loads(reply.read())
        tensors = [(t["name"], t["datatype"], list(t["shape"])) for t in meta["inputs"]]
    else:
        import grpc

        from onnxgate_client.pb import grpc_service_pb2 as pb
        from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

        host, port = target.address
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelMetadataRequest(name=target.model, version=target.model_version)
            meta = stub.ModelMetadata(request, timeout=10)
        tensors = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    specs = []
    for name, datatype, shape in tensors:
        dims = shape[1:] if target.batched and shape and shape[0] == -1 else shape
        if any(d < 0 for d in dims):
            raise ValueError(f"input '{name}' has dynamic dims {shape}; give its shape with --input {name}:DT:DIMS")
        specs.append(TensorSpec(name, datatype, tuple(dims)))
    return specs
