"""One loaded model version: its ONNX Runtime session(s), completed config, and checks.

Everything here is synchronous. ``load`` and ``run`` block and belong in worker threads;
``validate`` is cheap and runs on the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxgate.core import model_config
from onnxgate.core.inference import InferInput
from onnxgate.core.model_config import GraphTensor, TensorSpec
from onnxgate.errors import InferenceFailed, InvalidInput, ModelLoadError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Server-wide settings that shape how a version is loaded."""

    default_max_batch_size: int = 256
    cpu_threads: int = 0  # intra-op threads per session; 0 = available cores


def available_cores() -> int:
    """CPU cores this process may use, honouring affinity and the cgroup v2 quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class ModelVersion:
    """A version ready to run: sessions, served tensor specs and completed config."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        sessions: Sequence[ort.InferenceSession],
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
        self.providers = self.sessions[0].get_providers() if self.sessions else []

    @classmethod
    def load(cls, name: str, version: int, path: Path, config: mc.ModelConfig, options: LoadOptions) -> ModelVersion:
        """Create sessions for ``path`` and complete ``config`` from its graph (blocking)."""
        if not path.is_file():
            raise ModelLoadError(f"version {version}: missing {path.name}")
        session = _make_session(path, config, options)
        graph_inputs = [GraphTensor(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]
        graph_outputs = [GraphTensor(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()]
        completed = model_config.complete(config, name, graph_inputs, graph_outputs, options.default_max_batch_size)
        count = max(1, sum(g.count or 1 for g in completed.instance_group))
        sessions = [session] + [_make_session(path, completed, options) for _ in range(count - 1)]
        return cls(name, version, completed, sessions)

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
        """The output names to compute: all when none are asked for; unknown ones rejected."""
        if not names:
            return self.output_names
        for n in names:
            if n not in self.outputs:
                raise InvalidInput(f"unknown output '{n}' for model '{self.name}'; outputs are {self.output_names}")
        return list(dict.fromkeys(names))

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str], instance: int = 0) -> list[np.ndarray]:
        """Run one session (blocking; ONNX Runtime releases the GIL)."""
        try:
            return self.sessions[instance].run(list(outputs), dict(feeds))
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise InferenceFailed(f"model '{self.name}' version {self.version}: {exc}") from None

    def close(self) -> None:
        """Drop the sessions so their memory returns."""
        self.sessions.clear()


def _make_session(path: Path, config: mc.ModelConfig, options: LoadOptions) -> ort.InferenceSession:
    so = ort.SessionOptions()
    params = {k: v.string_value for k, v in config.parameters.items()}
    intra = int(params.get("intra_op_thread_count", options.cpu_threads or available_cores()))
    so.intra_op_num_threads = max(1, intra)
    so.inter_op_num_threads = max(1, int(params.get("inter_op_thread_count", 1)))
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path.parent.name}/{path.name}: {exc}") from None
