"""Protocol-neutral inference request and response, as the front ends hand them to the core."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxgate.errors import InvalidInput

Parameters = dict[str, Any]


MAX_VERSION_DIGITS = 18  # versions are int64 in the model config


def parse_version(text: str) -> int | None:
    """A version as written in a request ("3"), or None when it is not one: ASCII digits only
    (``"²".isdigit()`` is true, ``int("²")`` fails) and short enough for an int64."""
    if text.isascii() and text.isdigit() and len(text) <= MAX_VERSION_DIGITS:
        return int(text)
    return None


@dataclass(slots=True)
class InferInput:
    """One decoded input tensor; ``data`` already has ``shape``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass(slots=True)
class RequestedOutput:
    """An output the caller asked for, with its per-output parameters."""

    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request."""

    model_name: str
    model_version: str  # "" = let the gateway choose
    inputs: list[InferInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    protocol: str = ""  # "grpc" | "http", for metrics and logs only
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case HTTP headers / gRPC metadata
    deadline_ns: int = 0  # when its answer is due (time.perf_counter_ns); 0 = none
    request_id: str = ""  # its one id (``core.exchange``): the client's X-Request-Id, else ``id``, else made
    exchange: Any = None  # its ``core.exchange.Exchange`` (None for a shadow copy, or called without one)


@dataclass(slots=True)
class InferOutput:
    """One output tensor of a response."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    """The answer to an :class:`InferRequest`."""

    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    provenance: Mapping[str, str] = field(default_factory=dict)  # not on the wire: e.g. the MLflow run
    compute_ns: int = 0  # not on the wire: its batch's execution time, without the queue wait

    def nbytes(self) -> int:
        """The outputs' array bytes (a BYTES element counts as its pointer): what encoding costs."""
        return sum(o.data.nbytes for o in self.outputs)


_MAX_TIMEOUT_US = (1 << 63) - 1  # an int64, as Triton's parameter


def timeout_us(request: InferRequest) -> int | None:
    """The request's ``timeout`` parameter (microseconds; Triton's), or None when it has none."""
    value = request.parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TIMEOUT_US:
        raise InvalidInput(
            f"parameter 'timeout' must be an integer of 0..{_MAX_TIMEOUT_US} (microseconds), got {value!r:.40}"
        )
    return value


DEADLINE_HEADER = "x-request-deadline-ms"
REQUEST_ID_HEADER = "x-request-id"  # the request's one id, given by the client or echoed by the gateway
MAX_DEADLINE_MS = 24 * 3600 * 1000


def deadline_from_header(text: str, received_ns: int) -> int:
    """The deadline an ``X-Request-Deadline-Ms`` header sets: milliseconds (a decimal number
    > 0, at most a day) from ``received_ns``, when the request arrived (perf_counter_ns)."""
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not 0 < ms <= MAX_DEADLINE_MS:  # NaN and inf fail too
        raise InvalidInput(
            f"header X-Request-Deadline-Ms must be a number of milliseconds in (0, {MAX_DEADLINE_MS}], "
            f"got {text!r:.40}"
        )
    return received_ns + int(ms * 1e6)


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
