"""One loaded model version: its ONNX Runtime session(s), completed config, and checks.

Everything here is synchronous. ``load`` and ``run`` block and belong in worker threads;
``validate`` is cheap and runs on the event loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxgate.core.inference import InferInput
from onnxgate.core.serving import model_config, model_files, sessions
from onnxgate.core.serving.model_config import GraphTensor, TensorSpec
from onnxgate.errors import InferenceFailed, InvalidInput, ModelLoadError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Server-wide settings that shape how a version is loaded."""

    default_max_batch_size: int = 256
    cpu_threads: int = 0  # intra-op threads per session; 0 = share cpu_budget between instances
    cpu_budget: int = 0  # cores this process may use; 0 = available cores
    max_queue_bytes: int = 256 * 1024 * 1024  # tensors queued per version (shadow copies included); 0 = no bound
    scheduler: str = "deadline"  # "fifo": deadline ordering, admission and adaptive delay off


class ModelVersion:
    """A version ready to run: sessions, served tensor specs and completed config."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        sessions: Sequence[ort.InferenceSession],
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.sessions = list(sessions)
        self.max_batch_size = config.max_batch_size
        self.batched = self.max_batch_size > 0
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in model_config.tensor_specs(config.input)}
        self.outputs: dict[str, TensorSpec] = {t.name: t for t in model_config.tensor_specs(config.output)}
        self.output_names = list(self.outputs)
        # ``reshape``: what ONNX Runtime sees differs from what clients send and get
        lead = 1 if self.batched else 0
        self._reshape_in = {n: (lead, s.reshape) for n, s in self.inputs.items() if s.reshape is not None}
        self._reshape_out = {n: (lead, s.dims) for n, s in self.outputs.items() if s.reshape is not None}
        self.labels = {k: list(v) for k, v in (labels or {}).items()}  # output -> class names (label_filename)
        self.max_request_elements = _max_request_elements(self)
        self.providers = self.sessions[0].get_providers() if self.sessions else []
        # Where the version came from (registry parameters such as mlflow_run_id), for records.
        self.provenance = {k: v.string_value for k, v in config.parameters.items() if k.startswith("mlflow_")}

    @classmethod
    def load(
        cls, name: str, version: int, path: Path, config: mc.ModelConfig, options: LoadOptions,
        model_dir: Path | None = None,
    ) -> ModelVersion:
        """Create sessions for ``path``, complete ``config`` from its graph, read its labels, warm
        up (blocking). ``model_dir`` (the model's directory, where ``warmup/`` and label files are)
        defaults to the model file's grandparent."""
        if not path.is_file():
            raise ModelLoadError(f"version {version}: missing {path.name}")
        model_dir = path.parent.parent if model_dir is None else model_dir
        model_config.check_limits(config)
        plans = sessions.plan_instances(config)
        so = sessions.session_options(config, len(plans), options.cpu_threads, options.cpu_budget)
        first = sessions.create(path, config, plans[0], so)
        graph_inputs = [GraphTensor(i.name, i.type, tuple(i.shape)) for i in first.get_inputs()]
        graph_outputs = [GraphTensor(o.name, o.type, tuple(o.shape)) for o in first.get_outputs()]
        completed = model_config.complete(config, name, graph_inputs, graph_outputs, options.default_max_batch_size)
        made = [first] + [sessions.create(path, completed, plan, so) for plan in plans[1:]]
        used = sorted({s.get_providers()[0] for s in made})
        completed.parameters["execution_provider"].string_value = ",".join(used)
        model = cls(name, version, completed, made, model_files.read_labels(model_dir, completed))
        model.warmup(model_dir)
        return model

    def warmup(self, model_dir: Path) -> None:
        """Run every session on the warm-up feeds; a failure fails the load."""
        declared = bool(self.config.model_warmup)
        for feeds, count in sessions.warmup_feeds(self.config, self.inputs, model_dir):
            for slot in range(len(self.sessions)):
                for _ in range(count):
                    try:
                        self.sessions[slot].run(self.output_names, _reshaped(feeds, self._reshape_in))
                    except Exception as exc:
                        if declared:
                            raise ModelLoadError(f"version {self.version}: warm-up run failed: {exc}") from None
                        # Zeros with dynamic dims as 1 may not suit every graph; that is no fault.
                        log.warning("model %s version %d: default warm-up skipped: %s", self.name, self.version, exc)
                        return

    def validate(self, inputs: Sequence[InferInput]) -> tuple[dict[str, np.ndarray], int]:
        """Check inputs against the served specs; return ONNX Runtime feeds and the batch rows."""
        feeds: dict[str, np.ndarray] = {}
        rows = 0
        for item in inputs:
            spec = self.inputs.get(item.name)
            if spec is None:
                raise InvalidInput(
                    f"unexpected input '{item.name}' for model '{self.name}'; expected {sorted(self.inputs)}"
                )
            if item.name in feeds:
                raise InvalidInput(f"input '{item.name}' is given twice")
            if item.datatype != spec.dtype.v2:
                raise InvalidInput(f"input '{item.name}': expected datatype {spec.dtype.v2}, got {item.datatype}")
            shape = list(item.shape)
            expected = spec.shape(self.batched)
            if len(shape) != len(expected) or any(e != -1 and e != s for e, s in zip(expected, shape, strict=False)):
                raise InvalidInput(f"input '{item.name}': expected shape {expected}, got {shape}")
            if self.batched:
                if shape[0] < 1 or shape[0] > self.max_batch_size:
                    raise InvalidInput(
                        f"input '{item.name}': batch size {shape[0]} is outside 1..{self.max_batch_size} "
                        f"(max_batch_size of model '{self.name}')"
                    )
                if rows and shape[0] != rows:
                    raise InvalidInput(f"input '{item.name}': batch size {shape[0]} differs from other inputs' {rows}")
                rows = shape[0]
            feeds[item.name] = item.data
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise InvalidInput(f"model '{self.name}' expects inputs {missing} that the request does not give")
        return feeds, rows or 1

    def check_outputs(self, names: Sequence[str]) -> list[str]:
        """The output names to compute: all when none are asked for; unknown and repeated ones
        rejected (as repeated inputs are)."""
        if not names:
            return self.output_names
        for n in names:
            if n not in self.outputs:
                raise InvalidInput(f"unknown output '{n}' for model '{self.name}'; outputs are {self.output_names}")
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise InvalidInput(f"output '{n}' is requested twice")
            seen.add(n)
        return list(names)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str], instance: int = 0) -> list[np.ndarray]:
        """Run one session (blocking; ONNX Runtime releases the GIL)."""
        try:
            if not (self._reshape_in or self._reshape_out):
                return self.sessions[instance].run(list(outputs), dict(feeds))
            results = self.sessions[instance].run(list(outputs), _reshaped(feeds, self._reshape_in))
            return [_reshape(r, self._reshape_out[n]) if n in self._reshape_out else r
                    for n, r in zip(outputs, results, strict=True)]
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise InferenceFailed(f"model '{self.name}' version {self.version}: {exc}") from None

    def close(self) -> None:
        """Drop the sessions so their memory returns."""
        self.sessions.clear()


def _max_request_elements(model: ModelVersion) -> int | None:
    """The most tensor elements a valid request for ``model`` can carry; None when a variable
    dim or a BYTES input leaves it unbounded (then the transport's limit bounds the request)."""
    rows = model.max_batch_size if model.batched else 1
    total = 0
    for spec in model.inputs.values():
        dims = list(spec.dims)
        if spec.dtype.v2 == "BYTES" or any(d < 0 for d in dims):
            return None
        total += rows * math.prod(dims)
    return total


def _reshape(arr: np.ndarray, how: tuple[int, tuple[int, ...]]) -> np.ndarray:
    """``arr`` with its dims after the first ``lead`` (the batch) replaced (a view)."""
    lead, dims = how
    return arr.reshape(arr.shape[:lead] + tuple(dims))


def _reshaped(feeds: Mapping[str, np.ndarray], how: Mapping[str, tuple[int, tuple[int, ...]]]) -> dict:
    return {n: _reshape(a, how[n]) if n in how else a for n, a in feeds.items()}
