"""Hypothesis strategies for the property tests (``test_properties*.py``): arrays of every wire
datatype, JSON-like documents, infer request documents that are almost right, gRPC
ModelInferRequest messages with arbitrary tensors, contents, raw contents and parameters, and
model inputs that are nearly right; plus the one settings profile every property test uses.

Nothing here runs on import but strategy construction.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxgate.core.inference import InferInput
from onnxgate.core.serving import tensors
from onnxgate.core.serving.model import ModelVersion
from onnxgate.errors import GatewayError
from onnxgate_client.pb import grpc_service_pb2 as pb

# Fixed examples, no database: a CI run explores exactly what a local run does.
PROFILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def settings_(examples: int):
    return settings(PROFILE, max_examples=examples)


def result_or_gateway_error(fn, *args):
    """``fn(*args)``, or None when it raised a GatewayError; anything else propagates."""
    try:
        return fn(*args)
    except GatewayError:
        return None


V2_NAMES = tuple(d.v2 for d in tensors.DATATYPES)
# Names a client might send by mistake: other spellings, ONNX and config names, empty.
WRONG_DATATYPES = ("FLOAT", "fp32", "TYPE_FP32", "BF16", "STRING", "", "INT128", "FP32 ", "tensor(float)")
# Dims that matter: 0, small, past numpy's index range, past int64 (JSON only).
DIMS = st.one_of(
    st.integers(0, 4),
    st.sampled_from([-1, 2**31, 2**40, 2**40 + 1, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
SHAPES = st.lists(DIMS, max_size=5) | st.lists(st.just(1), min_size=30, max_size=40)
SMALL_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)

# Text that UTF-8 can carry (hypothesis' text() leaves out surrogates): BYTES elements.
TEXT = st.text(max_size=6)
# Text with lone surrogates and the like, for names and ids of JSON documents.
ANY_TEXT = st.text(alphabet=st.characters() | st.characters(categories=["Cs"]), max_size=6)


def rarely(draw) -> bool:
    """True about one time in eight (hypothesis draws small integers far more often than their
    share, so ``integers(0, 9) == 0`` would be true much more often than one time in ten)."""
    return draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans())


def dtype_of(v2: str) -> np.dtype:
    return tensors.BY_V2[v2].numpy


@st.composite
def arrays(draw, v2: str | None = None, shape=None) -> tuple[str, np.ndarray]:
    """(V2 datatype, array of it) with any values the datatype holds (NaN, inf, -0.0 included)."""
    v2 = v2 or draw(st.sampled_from(V2_NAMES))
    shape = draw(SMALL_SHAPES) if shape is None else shape
    strategy = hnp.arrays(object, shape, elements=TEXT) if v2 == "BYTES" else hnp.arrays(dtype_of(v2), shape)
    return v2, draw(strategy)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**400, -(10**400), 2**64, 2**63, -(2**63) - 1]),
    st.floats(),
    ANY_TEXT,
)


def json_values(keys=ANY_TEXT, max_leaves: int = 12):
    """Any JSON-like value: null, bools, ints of any size, floats with NaN/inf, text, lists, objects."""
    def nest(kids):
        return st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4)

    return st.recursive(SCALARS, nest, max_leaves=max_leaves)


PARAM_KEYS = st.sampled_from(
    ["binary_data_size", "binary_data", "binary_data_output", "timeout", "classification", "priority",
     "shared_memory_region", "shared_memory_byte_size", "sequence_id", "x"]
)
PARAMS = st.dictionaries(PARAM_KEYS, json_values(max_leaves=3), max_size=3) | json_values(max_leaves=3)


def fits(v2: str, shape: list[int]) -> bool:
    """Whether an array of ``shape`` can be drawn: a known datatype and at most 24 elements,
    every dimension small (a 0 does not make [0, 2**40] drawable)."""
    return v2 in tensors.BY_V2 and all(0 <= d <= 24 for d in shape) and tensors.element_count(shape) <= 24


INPUT_MUTATIONS = ("datatype", "shape", "data", "binary_size", "tail", "data_and_binary", "missing", "parameters")


@st.composite
def input_docs(draw) -> tuple[dict, bytes]:
    """One entry of a request's ``inputs`` and the binary bytes it brings along: a valid entry
    (JSON data, flat or nested, or binary) with none, one or two things wrong with it."""
    v2 = draw(st.sampled_from(V2_NAMES))
    shape = list(draw(SMALL_SHAPES))
    _, arr = draw(arrays(v2, tuple(shape)))
    doc: dict[str, Any] = {"name": draw(st.sampled_from(["x", "text", "INPUT0"]) | ANY_TEXT), "shape": shape,
                           "datatype": v2}
    tail = b""
    if draw(st.booleans()):
        tail = tensors.encode_raw(tensors.BY_V2[v2], arr)
        doc["parameters"] = {"binary_data_size": len(tail)}
    else:
        doc["data"] = arr.tolist() if draw(st.booleans()) else arr.ravel().tolist()
    for mutation in draw(st.lists(st.sampled_from(INPUT_MUTATIONS), max_size=2)):
        if mutation == "datatype":
            doc["datatype"] = draw(st.sampled_from((*V2_NAMES, *WRONG_DATATYPES)) | json_values(max_leaves=2))
        elif mutation == "shape":
            doc["shape"] = draw(SHAPES | json_values(max_leaves=3))
        elif mutation == "data":
            doc["data"] = draw(json_values(max_leaves=6) | arrays().map(lambda c: c[1].tolist()))
        elif mutation == "binary_size":
            doc["parameters"] = {"binary_data_size": draw(st.integers(-2, len(tail) + 8) | json_values(max_leaves=2))}
        elif mutation == "tail":
            tail = draw(st.binary(max_size=64))
        elif mutation == "data_and_binary":
            doc["data"] = arr.ravel().tolist()
            tail = tensors.encode_raw(tensors.BY_V2[v2], arr)
            doc["parameters"] = {"binary_data_size": len(tail)}
        elif mutation == "missing":
            doc.pop(draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"])), None)
        else:
            doc["parameters"] = draw(PARAMS)
    return doc, tail


@st.composite
def infer_bodies(draw) -> tuple[bytes, int | None]:
    """An HTTP infer body (JSON, maybe with binary tensors after it) and its
    Inference-Header-Content-Length, all nearly right."""
    entries = draw(st.lists(input_docs(), min_size=1, max_size=3))
    doc: dict[str, Any] = {"inputs": [e for e, _ in entries]}
    if rarely(draw):
        doc["inputs"] = draw(json_values())
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": ANY_TEXT}, optional={"parameters": PARAMS}), max_size=2)
            | json_values(max_leaves=4)
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(PARAMS)
    if draw(st.booleans()):
        doc["id"] = draw(json_values(max_leaves=2))
    header = json.dumps(doc).encode("utf-8", "surrogatepass")  # NaN/Infinity tokens, lone surrogates
    tail = b"".join(t for _, t in entries)
    body = header + tail
    length = len(header) if tail else None
    if rarely(draw):
        length = draw(st.none() | st.integers(-3, len(body) + 3))
    return body, length


# -- gRPC --------------------------------------------------------------------------------------

_CONTENTS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6) | TEXT.map(str.encode),
}


@st.composite
def grpc_params(draw, target) -> None:
    """Fill a protobuf parameters map with every kind of InferParameter."""
    for key in draw(st.lists(PARAM_KEYS, max_size=3)):
        p = target[key]
        kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
        value = {
            "bool_param": st.booleans(),
            "int64_param": st.integers(-(2**63), 2**63 - 1),
            "string_param": st.text(max_size=6),
            "double_param": st.floats(),
            "uint64_param": st.integers(0, 2**64 - 1),
        }[kind]
        setattr(p, kind, draw(value))


@st.composite
def grpc_requests(draw) -> pb.ModelInferRequest:
    """A ModelInferRequest with arbitrary tensors: datatypes, shapes (negative, huge), typed
    contents of any field, raw contents of any length, parameters of every type."""
    req = pb.ModelInferRequest(model_name="m", model_version=draw(st.sampled_from(["", "1", "x"])))
    use_raw = draw(st.booleans())
    raws = []
    for _ in range(draw(st.integers(0, 3))):
        v2 = draw(st.sampled_from(V2_NAMES) | st.sampled_from(WRONG_DATATYPES))
        shape = draw(st.lists(DIMS.filter(lambda d: -(2**63) <= d < 2**63), max_size=4) | SMALL_SHAPES.map(list))
        t = req.inputs.add(name=draw(st.text(max_size=4)), datatype=v2, shape=shape)
        drawable = fits(v2, shape)
        if use_raw or rarely(draw):
            if drawable and draw(st.booleans()):
                _, arr = draw(arrays(v2, tuple(shape)))
                raws.append(tensors.encode_raw(tensors.BY_V2[v2], arr))
            else:
                raws.append(draw(st.binary(max_size=64)))
        if not use_raw or rarely(draw):
            for field in draw(st.lists(st.sampled_from(sorted(_CONTENTS)), max_size=2)):
                n = tensors.element_count(shape) if drawable and draw(st.booleans()) else draw(st.integers(0, 6))
                getattr(t.contents, field).extend(draw(st.lists(_CONTENTS[field], min_size=n, max_size=n)))
        if rarely(draw):
            draw(grpc_params(t.parameters))
    if rarely(draw):
        raws = raws[: draw(st.integers(0, len(raws)))] + draw(st.lists(st.binary(max_size=8), max_size=1))
    req.raw_input_contents.extend(raws)
    for _ in range(draw(st.integers(0, 2))):
        out = req.outputs.add(name=draw(st.text(max_size=4)))
        draw(grpc_params(out.parameters))
    draw(grpc_params(req.parameters))
    return req


@st.composite
def model_inputs(draw, model: ModelVersion) -> list[InferInput]:
    """Inputs for ``model``, each nearly right: names, datatypes, ranks, dims and batch sizes off
    by a little, inputs missing, extra or twice; data always has the shape it claims (the
    decoders see to that)."""
    names = list(model.inputs)
    chosen = draw(st.lists(st.sampled_from([*names, "nope", ""]), max_size=len(names) + 1))
    if draw(st.booleans()):
        chosen = names  # all present, so the checks past the names run
    rows = draw(st.integers(0, model.max_batch_size + 1))
    out = []
    for name in chosen:
        spec = model.inputs.get(name)
        if spec is not None and draw(st.integers(0, 3)):
            v2 = spec.dtype.v2
            dims = [d if d >= 0 else draw(st.integers(0, 3)) for d in spec.dims]
            shape = [rows, *dims] if model.batched else dims
        else:
            v2 = draw(st.sampled_from(V2_NAMES))
            shape = draw(st.lists(st.integers(0, 4), max_size=4))
        if rarely(draw) and shape:
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = draw(st.integers(0, 9))
        if rarely(draw):
            shape = [*shape, 1] if draw(st.booleans()) else shape[:-1]
        _, arr = draw(arrays(v2, tuple(shape)))
        out.append(InferInput(name, v2, shape, arr))
    return out
