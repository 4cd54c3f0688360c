"""The outputs of one answer: which outputs a request asks to classify, and each result array
as an output (as is, or its top-k classes: Triton's classification extension).
"""

from __future__ import annotations

import numpy as np

from onnxgate.core.inference import InferOutput, InferRequest
from onnxgate.core.serving.model import ModelVersion
from onnxgate.errors import InvalidInput


def classification(request: InferRequest, model: ModelVersion) -> dict[str, int]:
    """The outputs the request asks to classify, with their ``k`` (checked against the model)."""
    wanted: dict[str, int] = {}
    for out in request.outputs:
        k = out.parameters.get("classification")
        if k is None:
            continue
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput(f"output '{out.name}': classification must be a positive integer, got {k!r}")
        spec = model.outputs[out.name]
        if spec.dtype.v2 == "BYTES" or spec.dtype.v2 == "BOOL":
            raise InvalidInput(f"output '{out.name}': classification needs a numeric output, not {spec.dtype.v2}")
        wanted[out.name] = k
    return wanted


def make_output(model: ModelVersion, name: str, arr: np.ndarray, classify: int) -> InferOutput:
    """The output ``name`` of one answer: the array itself, or its top ``classify`` classes."""
    spec = model.outputs[name]
    if not classify:
        return InferOutput(name, spec.dtype.v2, list(arr.shape), arr)
    # Top-k classes per batch row (or of the whole tensor without a batch dimension), as
    # "value:index" strings ("value:index:label" with a label file), highest first, like
    # Triton's classification extension.
    rows = arr.reshape(arr.shape[0], -1) if model.batched else arr.reshape(1, -1)
    n = rows.shape[1]
    k = min(classify, n)
    # Descending order, ties by lower index, without negating (which overflows integers).
    top = (n - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1])[:, :k]
    values = np.take_along_axis(rows, top, axis=1)
    fmt = "{:f}:{}" if values.dtype.kind == "f" else "{}:{}"
    names = model.labels.get(name, ())  # label_filename's lines: "value:index:label", as Triton answers
    labels = np.array(
        [fmt.format(v, i) + (f":{names[i]}" if i < len(names) else "")
         for v, i in zip(values.ravel().tolist(), top.ravel().tolist(), strict=True)], dtype=object
    ).reshape(values.shape)
    if not model.batched:
        labels = labels.reshape(k)
    return InferOutput(name, "BYTES", list(labels.shape), labels)
