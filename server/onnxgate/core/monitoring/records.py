"""The sample log's records: the raw objects of one sampled request (:class:`Sample`) and the
record the writer makes of it (:func:`make_record`).

Record schema, version 1 (JSON; the Parquet sink stores the same values, see ``file_sinks.py``)::

    schema_version  1
    time            RFC 3339 UTC time the gateway finished the request, "2024-05-01T12:00:00.123456Z"
    id              the V2 request id the client sent ("" if none)
    request_id      the gateway's request id (the X-Request-Id header, else ``id``, else made:
                    ``core/exchange.py``), as in the access log and the trace
    trace_id        the request's trace id (32 hex digits) when it was traced, else ""
    route           the route the request came in on (the model name when no router is in front)
    model, version  the model, and the version that answered ("" when none did)
    protocol        "grpc" | "http" (the only transport-specific field)
    latency_s       seconds from the decoded request to the response or error
    status          "ok", or the error's class name ("InvalidInput", "Overloaded", ...)
    error           the error message, or null
    headers         {allowlisted header, lowercase: value}
    inputs          [{name, datatype, shape, values}] or null when not included; values are
                    nested lists (BYTES as UTF-8 text, NaN as null), null past max_tensor_elements
    outputs         the same; [] for a failed request
    shadow          {target, version, status, error, outputs, comparison} or null
    model_tags      where the answering version came from: the registry's parameters of that
                    version (``mlflow_model``, ``mlflow_version``, ``mlflow_run_id``, ``mlflow_alias``)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from onnxgate.core.inference import InferRequest, InferResponse
from onnxgate.core.monitoring.config import INCLUDE
from onnxgate.core.monitoring.sample_memory import SAMPLE_OVERHEAD, headers_nbytes, held_nbytes, owned_copies
from onnxgate.core.tracing import Tracing

SCHEMA_VERSION = 1


@dataclass(slots=True)
class ShadowResult:
    """What a shadow target answered to the same request."""

    target: str
    response: InferResponse | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class Sample:
    """The raw objects of one sampled request; the writer thread turns it into a record."""

    request: InferRequest
    response: InferResponse | None
    error: BaseException | None
    route: str
    model: str
    version: str
    protocol: str
    latency_s: float
    headers: Mapping[str, str] | None = None  # None: the request's own headers
    shadow: ShadowResult | None = None
    comparison: Mapping[str, Any] | None = None
    time: float = field(default_factory=time.time)

    def nbytes(self) -> int:
        """Memory this sample keeps alive: its tensors (a view counts all it is a view of), the
        strings of BYTES tensors, the headers and its own objects. Exact or over, never under."""
        tensors = [t.data for t in self.request.inputs]
        if self.response is not None:
            tensors += [t.data for t in self.response.outputs]
        if self.shadow is not None and self.shadow.response is not None:
            tensors += [t.data for t in self.shadow.response.outputs]
        total = SAMPLE_OVERHEAD + sum(map(held_nbytes, tensors)) + headers_nbytes(self.request.headers)
        if self.headers is not None and self.headers is not self.request.headers:
            total += headers_nbytes(self.headers)
        return total

    def compact(self) -> None:
        """Copy tensors that are views into larger buffers (only their own rows), replacing the
        request and responses by shallow copies: never changed, the caller may still use them."""
        inputs = owned_copies(self.request.inputs)
        if inputs is not None:
            self.request = dataclasses.replace(self.request, inputs=inputs)
        if self.response is not None:
            outputs = owned_copies(self.response.outputs)
            if outputs is not None:
                self.response = dataclasses.replace(self.response, outputs=outputs)
        if self.shadow is not None and self.shadow.response is not None:
            outputs = owned_copies(self.shadow.response.outputs)
            if outputs is not None:
                self.shadow.response = dataclasses.replace(self.shadow.response, outputs=outputs)


def rfc3339(t: float) -> str:
    """``t`` (seconds since the epoch) as RFC 3339 UTC with microseconds."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tensor_json(name: str, datatype: str, shape: Sequence[int], data: Any, max_elements: int = 1_000_000) -> dict:
    """One tensor as ``{name, datatype, shape, values}``, values as nested lists."""
    arr = np.asarray(data)
    if arr.size > max_elements:
        values = None
    elif arr.dtype.kind in "OSU":
        flat = [v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v) for v in arr.ravel()]
        values = np.array(flat, dtype=object).reshape(arr.shape).tolist()
    else:
        values = arr.tolist()
    return {"name": name, "datatype": datatype, "shape": [int(d) for d in shape], "values": values}


def _trace_id(request: InferRequest) -> str:
    exchange = request.exchange
    span = exchange.span if exchange is not None else None
    return Tracing.trace_id(span) if span is not None else ""


def _status(error: BaseException | None) -> tuple[str, str | None]:
    if error is None:
        return "ok", None
    return type(error).__name__, getattr(error, "message", None) or str(error)


def make_record(
    request: InferRequest,
    response: InferResponse | None,
    error: BaseException | None,
    *,
    route: str,
    model: str,
    version: str,
    protocol: str,
    latency_s: float,
    headers: Mapping[str, str],
    shadow: ShadowResult | None = None,
    comparison: Mapping[str, Any] | None = None,
    include: Sequence[str] = INCLUDE,
    when: float | None = None,
    max_elements: int = 1_000_000,
) -> dict[str, Any]:
    """The version-1 record of one request (schema in the module docstring)."""
    status, message = _status(error)
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "time": rfc3339(time.time() if when is None else when),
        "id": request.id,
        "request_id": request.request_id,
        "trace_id": _trace_id(request),
        "route": route,
        "model": model,
        "version": version,
        "protocol": protocol,
        "latency_s": float(latency_s),
        "status": status,
        "error": message,
        "headers": {str(k): v if isinstance(v, str) else str(v) for k, v in headers.items()},
        "inputs": None,
        "outputs": None,
        "shadow": None,
        "model_tags": dict(response.provenance) if response is not None else {},
    }
    if "inputs" in include:
        record["inputs"] = [tensor_json(t.name, t.datatype, t.shape, t.data, max_elements) for t in request.inputs]
    if "outputs" in include:
        outs = response.outputs if response is not None else []
        record["outputs"] = [tensor_json(t.name, t.datatype, t.shape, t.data, max_elements) for t in outs]
    if "shadow" in include and shadow is not None:
        s_status, s_message = _status(shadow.error)
        s_outs = shadow.response.outputs if shadow.response is not None else []
        record["shadow"] = {
            "target": shadow.target,
            "version": shadow.response.model_version if shadow.response is not None else "",
            "status": s_status,
            "error": s_message,
            "outputs": [tensor_json(t.name, t.datatype, t.shape, t.data, max_elements) for t in s_outs],
            "comparison": dict(comparison) if comparison is not None else None,
        }
    return record
