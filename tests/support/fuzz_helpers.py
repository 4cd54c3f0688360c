"""Request mutators for the gateway fuzz run (``test_fuzz_gateway.py``).

Each ``*_case`` function starts from a valid request for a zoo model (``protocol_helpers.zoo_feeds``)
and applies a few mutations drawn from one ``random.Random``: shapes, datatypes, element counts,
values (huge numbers, NaN tokens, wrong types), nesting, duplicated and missing fields, binary
sizes, Inference-Header-Content-Length, Content-Encoding (with right and wrong data), content
types, parameters of every type, byte-level flips and cuts. The same seed gives the same cases.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxgate.core.serving import tensors
from onnxgate_client.pb import grpc_service_pb2 as pb
from protocol_helpers import zoo_feeds

MODELS = ("mlp", "add_sub", "string", "int_types", "fp16", "no_batch", "mixed_dtypes", "scaled")
V2_NAMES = tuple(d.v2 for d in tensors.DATATYPES)
WEIRD_DATATYPES = ("fp32", "FLOAT", "TYPE_FP32", "BF16", "", "STRING", "FP32\x00", "FP 32")
# Numbers a client could put anywhere a number goes; raw JSON text, so 1e400 and NaN stay tokens.
WEIRD_NUMBERS = (
    "0", "-1", "-0", "1.5", "2147483648", "4294967296", "9223372036854775807", "9223372036854775808",
    "18446744073709551616", "1" + "0" * 400, "-" + "9" * 400, "1e400", "-1e400", "1e-400", "NaN", "Infinity",
    "-Infinity", "true", "null", '"5"', "[]", "{}", "[1]",
)
WEIRD_VALUES = (*WEIRD_NUMBERS, '"x"', '"\\ud800"', '"\\u0000"', '{"a": {"b": [1, {}]}}', '"' + "é" * 300 + '"')
PARAM_KEYS = ("timeout", "classification", "binary_data", "binary_data_output", "binary_data_size", "priority",
              "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "sequence_id", "x")


# What leaves a valid request valid: every zoo model must answer 200 to these.
BENIGN = frozenset({"content_type", "encoding:gzip", "encoding:deflate", "encoding:gzip_members",
                    "encoding:label_only", "encoding:upper"})


@dataclass
class HttpCase:
    path: str
    body: bytes
    headers: dict[str, str]
    what: list[str] = field(default_factory=list)  # the model, then the mutations applied

    @property
    def valid(self) -> bool:
        """Nothing but benign changes: the gateway must answer 200."""
        return all(w in BENIGN for w in self.what[1:])


@dataclass(frozen=True)
class Raw:
    """A placeholder in a document for JSON text json.dumps cannot write (NaN tokens, 1e400, deep nesting)."""

    text: str


def _feeds(rng: random.Random, model: str) -> dict[str, np.ndarray]:
    rows = rng.choice([1, 1, 2, 3, 8]) if rng.random() < 0.97 else rng.choice([256, 257, 4096])  # batch bound 256
    feeds = zoo_feeds(model, rows=rows, seed=rng.randrange(1000))
    if model == "string" and rng.random() < 0.3:  # any Unicode the JSON and BYTES codecs must carry
        text = ["".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF),
                                         rng.randrange(0xE000, 0x10FFFF)])) for _ in range(rng.randrange(8)))
                for _ in range(rows)]
        feeds["text"] = np.array(text, dtype=object).reshape(rows, 1)
    return feeds


def _too_many_rows(model: str, feeds: dict[str, np.ndarray]) -> bool:
    return model != "no_batch" and max(a.shape[0] for a in feeds.values()) > 256  # default max_batch_size


def datatype_of(arr: np.ndarray) -> str:
    """The V2 datatype of a feed array (object arrays are BYTES)."""
    return "BYTES" if arr.dtype == object else next(d.v2 for d in tensors.DATATYPES if d.numpy == arr.dtype)


def _dumps(doc: Any) -> bytes:
    raws: list[str] = []

    def default(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, np.ndarray):
            return value.tolist()
        raise TypeError(type(value).__name__)

    text = json.dumps(doc, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


def _weird(rng: random.Random) -> Raw:
    return Raw(rng.choice(WEIRD_VALUES))


def _shape_mutation(rng: random.Random, shape: Any) -> list:
    shape = list(shape) if isinstance(shape, list) else [1]
    kind = rng.randrange(6)
    if kind == 0 and shape:
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 17, 257, 2**31, 2**40, 2**62, 2**63 - 1])
    elif kind == 1 and shape:
        shape[rng.randrange(len(shape))] = _weird(rng)
    elif kind == 2:
        shape = shape + [1] * rng.choice([1, 30, 100])
    elif kind == 3:
        shape = shape[:-1]
    elif kind == 4:
        shape = [rng.choice([0, 2**40]), *shape]
    else:
        shape = [-1 if d == shape[0] else d for d in shape]
    return shape


def _nest(values: list, depth: int) -> Raw:
    return Raw("[" * depth + _dumps(values).decode("utf-8", "surrogatepass") + "]" * depth)


def http_case(rng: random.Random) -> HttpCase:
    """One HTTP infer request for a random zoo model, valid or mutated a few times."""
    model = rng.choice(MODELS)
    feeds = _feeds(rng, model)
    what: list[str] = [model]
    if _too_many_rows(model, feeds):
        what.append("big_batch")
    entries, tails = [], []
    for name, arr in feeds.items():
        v2 = datatype_of(arr)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": v2}
        if rng.random() < 0.5:
            raw = tensors.encode_raw(tensors.BY_V2[v2], arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = arr.tolist() if rng.random() < 0.5 else arr.ravel().tolist()
            tails.append(b"")
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    if rng.random() < 0.3:
        doc["id"] = rng.choice(["req-1", "", "é" * 50, "x" * 3000])
    if rng.random() < 0.3:
        doc["parameters"] = {"binary_data_output": rng.random() < 0.5}
    mutations = rng.choice([0, 1, 1, 2, 2, 3, 4])
    for _ in range(mutations):
        entry = rng.choice(entries) if entries else {}
        i = entries.index(entry) if entries else 0
        kind = rng.choice(HTTP_MUTATIONS)
        what.append(kind)
        if kind == "shape":
            entry["shape"] = _shape_mutation(rng, entry.get("shape", []))
        elif kind == "shape_type":
            entry["shape"] = rng.choice([_weird(rng), "[1, 16]", {"0": 1}, [[1, 16]], None])
        elif kind == "datatype":
            entry["datatype"] = rng.choice([*V2_NAMES, *WEIRD_DATATYPES, _weird(rng)])
        elif kind == "count" and "data" in entry:
            arr = feeds.get(entry.get("name"))
            data = [] if arr is None else np.asarray(arr, dtype=object).ravel().tolist()
            entry["data"] = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + data[:3] + [0]
        elif kind == "value" and "data" in entry:
            flat = _flat(entry["data"])
            if flat:
                flat[rng.randrange(len(flat))] = _weird(rng)
            entry["data"] = flat
        elif kind == "data_type":
            entry["data"] = rng.choice([_weird(rng), "abc", {"0": 1}, [None], [[1], [1, 2]], [[[]]]])
        elif kind == "nest" and "data" in entry:
            entry["data"] = _nest(_flat(entry["data"]), rng.choice([1, 40, 70, 1100, 3000]))
        elif kind == "binary_size":
            params = entry.get("parameters")
            size = params.get("binary_data_size") if isinstance(params, dict) else None
            size = size if isinstance(size, int) else 0
            entry["parameters"] = {"binary_data_size": rng.choice([size + 1, size - 1, 0, -1, 2**40, 2**64,
                                                                   _weird(rng), str(size), float(size)])}
        elif kind == "binary_tail":
            tails[i] = rng.choice([b"", tails[i][:-1], tails[i] + b"\0", rng.randbytes(len(tails[i]) or 4),
                                   struct.pack("<I", 2**31) + b"ab"])
        elif kind == "both":
            arr = feeds.get(entry.get("name"))
            if arr is not None:
                entry["data"] = arr.ravel().tolist()
                raw = tensors.encode_raw(tensors.BY_V2[datatype_of(arr)], arr)
                entry["parameters"] = {"binary_data_size": len(raw)}
                tails[i] = raw
        elif kind == "drop_field":
            entry.pop(rng.choice(["name", "shape", "datatype", "data", "parameters"]), None)
        elif kind == "drop_inputs":
            doc["inputs"] = rng.choice([[], {}, "x", None, Raw("[" * 2000 + "]" * 2000)])
        elif kind == "dup_input" and entries:
            entries.append(dict(entry))
            tails.append(tails[i])
        elif kind == "extra_input":
            entries.append({"name": rng.choice(["nope", "", "x" * 5000, "\u0000"]), "shape": [1], "datatype": "FP32",
                            "data": [1.0]})
            tails.append(b"")
        elif kind == "outputs":
            doc["outputs"] = [_output(rng) for _ in range(rng.randrange(4))] if rng.random() < 0.8 else _weird(rng)
        elif kind == "params":
            doc["parameters"] = {rng.choice(PARAM_KEYS): _param_value(rng) for _ in range(rng.randrange(1, 4))}
        elif kind == "input_params":
            entry["parameters"] = {rng.choice(PARAM_KEYS): _param_value(rng) for _ in range(rng.randrange(1, 3))}
        elif kind == "id":
            doc["id"] = rng.choice([_weird(rng), 5, None, ["a"], {"a": 1}, "\U0001f600" * 10])
        elif kind == "surrogate":  # a lone surrogate, escaped or as raw UTF-8-style bytes, in some string
            text = rng.choice(["\ud800", "x\udfff", Raw('"\udc80"'), Raw('"a\\ud83d"')])
            where = rng.choice(["id", "input", "output", "param"])
            if where == "id":
                doc["id"] = text
            elif where == "input":
                entry["name"] = text
            elif where == "output":
                doc["outputs"] = [{"name": text}]
            else:
                doc["parameters"] = {rng.choice(["\ud800", "x"]): text}
        elif kind == "huge_int":  # past 64 bits: orjson refuses it, Python's json does not
            huge = Raw(rng.choice(["1" + "0" * 400, "-" + "9" * 300, "18446744073709551616"]))
            where = rng.choice(["timeout", "classification", "binary_data_size", "shape", "priority"])
            if where in ("timeout", "priority"):
                doc["parameters"] = {where: huge}
            elif where == "classification":
                doc["outputs"] = [{"name": rng.choice(["y", "OUTPUT0", "same"]), "parameters": {where: huge}}]
            elif where == "binary_data_size":
                entry["parameters"] = {where: huge}
            else:
                shape = entry.get("shape")
                entry["shape"] = [huge, *(shape[1:] if isinstance(shape, list) else [])]
    if rng.random() < 0.02:
        what.append("top_level")
        doc = rng.choice([[doc], "x", 5, None, {"inputs": doc}])
    return _http_encode(rng, model, doc, tails, what)


HTTP_MUTATIONS = (
    "shape", "shape", "shape_type", "datatype", "datatype", "count", "count", "value", "value", "data_type", "nest",
    "binary_size", "binary_size", "binary_tail", "both", "drop_field", "drop_inputs", "dup_input", "extra_input",
    "outputs", "params", "params", "input_params", "id", "surrogate", "huge_int",
)


def _flat(data: Any) -> list:
    return np.asarray(data, dtype=object).ravel().tolist() if isinstance(data, list) else [data]


def _output(rng: random.Random) -> Any:
    name = rng.choice(["y", "OUTPUT0", "same", "upper", "f32_out", "nope", "", "y"])
    out: dict[str, Any] = {"name": name}
    if rng.random() < 0.6:
        out["parameters"] = {rng.choice(["classification", "binary_data", "x"]): _param_value(rng)}
    return out if rng.random() < 0.9 else rng.choice([{"parameters": {}}, name, None, {"name": 5}])


def _param_value(rng: random.Random) -> Any:
    return rng.choice([
        0, 1, 3, 10, -1, 2**63, 2**64, True, False, None, 1.5, "3", "", [1, 2], {"a": {"b": 1}}, _weird(rng),
        rng.randrange(1, 1000),
    ])


def _http_encode(rng: random.Random, model: str, doc: Any, tails: list[bytes], what: list[str]) -> HttpCase:
    header = _dumps(doc)
    if rng.random() < 0.05 and b'{"name"' in header:  # a duplicated key: the last one wins in both parsers
        header = header.replace(b'{"name"', b'{"datatype": "FP64", "shape": [1], "name"', 1)
        what.append("dup_key")
    tail = b"".join(tails)
    body = header + tail
    headers: dict[str, str] = {}
    if tail:
        headers["Inference-Header-Content-Length"] = str(len(header))
    if rng.random() < 0.12:
        what.append("header_length")
        value = rng.choice([str(len(header) + rng.choice([-2, -1, 1, 2])), "0", str(len(body)), str(len(body) + 1),
                            "-1", "abc", " 12 ", "+12", "1e3", "9" * 19, "9" * 30, "", "0x10", "١٢"])
        if rng.random() < 0.2:
            headers.pop("Inference-Header-Content-Length", None)
        else:
            headers["Inference-Header-Content-Length"] = value
    if rng.random() < 0.05:
        what.append("content_type")
        headers["Content-Type"] = rng.choice(["text/plain", "application/octet-stream", "multipart/form-data; b=x",
                                              "application/json; charset=utf-16", "", "*/*"])
    if rng.random() < 0.15:
        body = _encode_body(rng, body, headers, what)
    if rng.random() < 0.1:
        body = mutate_bytes(rng, body)
        what.append("bytes")
    path = f"/v2/models/{model}/infer"
    if rng.random() < 0.08:
        version = rng.choice(["1", "2", "3", "0", "abc", "-1", "9" * 25, "%C2%B2", ""])
        path = f"/v2/models/{model}/versions/{version}/infer"
        what.append(f"version={version}")
    elif rng.random() < 0.03:
        path = rng.choice(["/v2/models/nope/infer", "/v2/models/broken/infer", "/v2/models/%00/infer",
                           "/v2/models//infer", f"/v2/models/{model}/infer/", "/v2/models/" + "m" * 3000 + "/infer"])
        what.append(path[:40])
    return HttpCase(path, body, headers, what)


def _encode_body(rng: random.Random, body: bytes, headers: dict[str, str], what: list[str]) -> bytes:
    kind = rng.choice(["gzip", "deflate", "gzip_members", "gzip_cut", "gzip_padded", "wrong_data", "label_only",
                       "unsupported", "upper", "bomb"])
    what.append(f"encoding:{kind}")
    if kind == "bomb":  # a second member of 32 MiB of JSON whitespace: past every bounded model's limit
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body) + _bomb_member()
    if kind == "gzip":
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body)
    if kind == "deflate":
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(body)
    if kind == "gzip_members":
        headers["Content-Encoding"] = "gzip"
        cut = rng.randrange(len(body) + 1)
        return gzip.compress(body[:cut]) + gzip.compress(body[cut:])
    if kind == "gzip_cut":
        headers["Content-Encoding"] = "gzip"
        packed = gzip.compress(body)
        return packed[: rng.randrange(len(packed))]
    if kind == "gzip_padded":
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body) + rng.choice([b"\0" * 8, b"garbage", gzip.compress(b"")[:5]])
    if kind == "wrong_data":  # a gzip header on a deflate body and the like
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate"])
        return rng.choice([zlib.compress(body), gzip.compress(body)[10:], body, rng.randbytes(64)])
    if kind == "label_only":
        headers["Content-Encoding"] = rng.choice(["identity", " identity ", ""])
        return body
    if kind == "unsupported":
        headers["Content-Encoding"] = rng.choice(["br", "zstd", "gzip, deflate", "x-gzip", "compress", "gzip;q=1"])
        return body
    headers["Content-Encoding"] = rng.choice(["GZIP", " Gzip ", "DEFLATE"])
    return gzip.compress(body) if "z" in headers["Content-Encoding"].lower() else zlib.compress(body)


@functools.cache
def _bomb_member() -> bytes:
    return gzip.compress(b" " * (32 << 20), compresslevel=1)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A few byte flips, cuts and insertions."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.45 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind < 0.65 and buf:
            del buf[rng.randrange(len(buf)) :]
        else:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.choice([rng.randbytes(rng.randint(1, 8)), b"\xff\xff\xff\x7f", b'"', b"[", b"}"])
    return bytes(buf)


# -- gRPC --------------------------------------------------------------------------------------

_CONTENTS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_FIELD_VALUES = {
    "bool_contents": lambda rng: rng.random() < 0.5,
    "uint_contents": lambda rng: rng.choice([0, 255, 256, 65536, 2**32 - 1]),
    "uint64_contents": lambda rng: rng.choice([0, 2**64 - 1]),
    "int_contents": lambda rng: rng.choice([0, -129, 128, 32768, -(2**31), 2**31 - 1]),
    "int64_contents": lambda rng: rng.choice([0, -(2**63), 2**63 - 1]),
    "fp32_contents": lambda rng: rng.choice([0.0, float("nan"), float("inf"), 3e38]),
    "fp64_contents": lambda rng: rng.choice([0.0, float("nan"), -float("inf"), 1e308]),
    "bytes_contents": lambda rng: rng.choice([b"", b"ok", b"\xff\xfe", "é".encode(), b"\0" * 10]),
}


def _set_param(rng: random.Random, target, key: str) -> None:
    kind = rng.choice(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"])
    value = {
        "bool_param": rng.random() < 0.5,
        "int64_param": rng.choice([0, 1, 3, -1, 2**63 - 1, -(2**63)]),
        "string_param": rng.choice(["", "3", "region", "x" * 500]),
        "double_param": rng.choice([0.0, 1.5, float("nan"), float("inf")]),
        "uint64_param": rng.choice([0, 5, 2**64 - 1]),
    }[kind]
    setattr(target[key], kind, value)


def grpc_message(rng: random.Random) -> tuple[pb.ModelInferRequest, bool]:
    """A ModelInferRequest for a random zoo model, valid or mutated a few times, and whether it is
    still valid (the gateway must answer it)."""
    model = rng.choice(MODELS)
    feeds = _feeds(rng, model)
    valid = not _too_many_rows(model, feeds)
    req = pb.ModelInferRequest(model_name=model)
    typed = rng.random() < 0.35 and model not in ("fp16",)
    for name, arr in feeds.items():
        v2 = datatype_of(arr)
        t = req.inputs.add(name=name, datatype=v2, shape=arr.shape)
        if typed:
            values = [s.encode() for s in arr.ravel()] if v2 == "BYTES" else arr.ravel().tolist()
            getattr(t.contents, _CONTENTS[v2]).extend(values)
        else:
            req.raw_input_contents.append(tensors.encode_raw(tensors.BY_V2[v2], arr))
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        valid = False
        t = rng.choice(req.inputs)
        i = list(req.inputs).index(t)
        kind = rng.choice(GRPC_MUTATIONS)
        if kind == "shape":
            shape = list(t.shape)
            if shape and rng.random() < 0.7:
                shape[rng.randrange(len(shape))] = rng.choice([0, -1, -(2**63), 257, 2**40, 2**62, 2**63 - 1])
            else:
                shape = shape + [1] * rng.choice([1, 40])
            del t.shape[:]
            t.shape.extend(shape)
        elif kind == "datatype":
            t.datatype = rng.choice([*V2_NAMES, *WEIRD_DATATYPES])
        elif kind == "raw" and req.raw_input_contents:
            raw = req.raw_input_contents[i] if i < len(req.raw_input_contents) else b""
            req.raw_input_contents[i % len(req.raw_input_contents)] = rng.choice(
                [raw[:-1], raw + b"\0", b"", raw * 2, struct.pack("<I", 2**31) + b"ab", b"\x02\0\0\0\xc3\x28"]
            )
        elif kind == "raw_count":
            if rng.random() < 0.5 and req.raw_input_contents:
                del req.raw_input_contents[-1]
            else:
                req.raw_input_contents.append(rng.choice([b"", b"\0" * 4]))
        elif kind == "contents":
            field = rng.choice(sorted(_FIELD_VALUES))
            getattr(t.contents, field).extend(_FIELD_VALUES[field](rng) for _ in range(rng.choice([1, 2, 16, 48])))
        elif kind == "params":
            _set_param(rng, rng.choice([req.parameters, t.parameters]), rng.choice(PARAM_KEYS))
        elif kind == "outputs":
            out = req.outputs.add(name=rng.choice(["y", "same", "upper", "nope", "", "OUTPUT1", "i8_out"]))
            if rng.random() < 0.7:
                _set_param(rng, out.parameters, rng.choice(["classification", "binary_data", "x"]))
        elif kind == "version":
            req.model_version = rng.choice(["1", "2", "3", "0", "abc", "-1", "9" * 25, "²", " 1"])
        elif kind == "model":
            req.model_name = rng.choice(["nope", "", "broken", "m" * 3000, "mlp/1", "MLP"])
        elif kind == "id":
            req.id = rng.choice(["", "x" * 10_000, "é" * 100])
        elif kind == "drop_input":
            del req.inputs[i]
            if i < len(req.raw_input_contents):
                del req.raw_input_contents[i]
            if not req.inputs:
                break
        elif kind == "dup_input":
            req.inputs.add().CopyFrom(t)
            if req.raw_input_contents:
                req.raw_input_contents.append(req.raw_input_contents[min(i, len(req.raw_input_contents) - 1)])
    return req, valid


GRPC_MUTATIONS = ("shape", "shape", "datatype", "raw", "raw", "raw_count", "contents", "contents", "params", "params",
                  "outputs", "version", "model", "id", "drop_input", "dup_input")


def grpc_case(rng: random.Random) -> tuple[bytes, bool]:
    """The serialized bytes of one (maybe mutated) ModelInferRequest, byte-mutated now and then,
    and whether they are still a valid request."""
    req, valid = grpc_message(rng)
    data = req.SerializeToString()
    if rng.random() < 0.15:
        data, valid = mutate_bytes(rng, data), False
    return data, valid
