"""ONNX Runtime sessions: execution providers, session options, thread budget and warm-up.

Config knobs (all optional, in ``config.pbtxt``):

* ``instance_group [{ count: 2, kind: KIND_CPU }]``: sessions working in parallel.
  ``KIND_GPU`` asks for CUDA on ``gpus`` (round robin); ``optimization { execution_accelerators
  { gpu_execution_accelerator [{ name: "tensorrt" }] } }`` puts TensorRT in front of it. A
  provider that this ONNX Runtime build lacks falls back to CPU with a warning; the provider
  actually used is reported in the config's ``parameters`` as ``execution_provider``.
* ``parameters``: ``intra_op_thread_count``, ``inter_op_thread_count``, ``execution_mode``
  (``sequential``/``parallel`` or 0/1), ``graph_optimization_level``
  (``disable``/``basic``/``extended``/``all``); Triton's ``optimization { graph { level } }``
  is honoured too (-1 disable, 0/absent all, 1 extended).
* Default thread budget: ``instances x intra-op threads <= available cores``.

Limits (a config past one fails that model with the reason, never the gateway): at most
:data:`MAX_INSTANCES` instances, :data:`MAX_THREADS` threads per pool, and warm-up inputs of at
most :data:`WARMUP_MAX_BYTES` over all declared warm-ups, with ``batch_size <= max_batch_size``
(the others are in ``model_config.check_limits``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxgate.core.serving import model_files, tensors
from onnxgate.core.serving.model_config import MAX_INSTANCES, TensorSpec
from onnxgate.errors import InvalidInput, ModelLoadError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

WARMUP_BUDGET_BYTES = 16 * 1024 * 1024  # the default warm-up batch's inputs stay under this
WARMUP_MAX_BYTES = 256 * 1024 * 1024  # the inputs of all declared model_warmup runs together
MAX_THREADS = 256  # intra- or inter-op threads of one session

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_cores() -> int:
    """CPU cores this process may use, honouring affinity and the cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """Where one session runs."""

    providers: list  # ONNX Runtime providers argument
    wanted: str  # the provider the config asked for


def plan_instances(config: mc.ModelConfig) -> list[InstancePlan]:
    """One plan per instance, from the config's instance groups and accelerators."""
    accelerators = [a.name.lower() for a in config.optimization.execution_accelerators.gpu_execution_accelerator]
    plans: list[InstancePlan] = []
    groups = list(config.instance_group) or [mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)]
    total = sum(max(1, g.count or 1) for g in groups)
    if total > MAX_INSTANCES or any(g.count < 0 for g in groups):
        raise ModelLoadError(f"instance_group asks for {total} instances; 1..{MAX_INSTANCES} are allowed")
    for group in groups:
        for i in range(max(1, group.count or 1)):
            if group.kind == mc.ModelInstanceGroup.KIND_GPU:
                device = group.gpus[i % len(group.gpus)] if group.gpus else 0
                chain: list = [(CUDA, {"device_id": device}), CPU]
                wanted = CUDA
                if "tensorrt" in accelerators:
                    chain.insert(0, (TENSORRT, {"device_id": device}))
                    wanted = TENSORRT
                plans.append(InstancePlan(chain, wanted))
            else:
                plans.append(InstancePlan([CPU], CPU))
    return plans


def _usable(providers: list) -> list:
    available = set(ort.get_available_providers())
    return [p for p in providers if (p[0] if isinstance(p, tuple) else p) in available]


def session_options(
    config: mc.ModelConfig, instances: int, cpu_threads: int, cpu_budget: int = 0
) -> ort.SessionOptions:
    """Session options from config parameters, within the default thread budget."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    so = ort.SessionOptions()
    default_intra = cpu_threads or max(1, (cpu_budget or available_cores()) // max(1, instances))
    so.intra_op_num_threads = _threads(params, "intra_op_thread_count", default_intra)
    so.inter_op_num_threads = _threads(params, "inter_op_thread_count", 1)
    mode = params.get("execution_mode", "sequential").lower()
    if mode not in ("sequential", "parallel", "0", "1"):
        raise ModelLoadError(f"execution_mode must be sequential or parallel, got {mode!r}")
    parallel = mode in ("parallel", "1")
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    level = params.get("graph_optimization_level")
    if level is None and config.optimization.HasField("graph"):
        level = {-1: "disable", 1: "extended"}.get(config.optimization.graph.level, "all")
    if level is not None:
        if level.lower() not in _OPT_LEVELS:
            raise ModelLoadError(f"graph_optimization_level must be one of {sorted(_OPT_LEVELS)}, got {level!r}")
        so.graph_optimization_level = _OPT_LEVELS[level.lower()]
    so.log_severity_level = 3
    return so


def _threads(params: dict[str, str], key: str, default: int) -> int:
    raw = params.get(key)
    if raw is None:
        return max(1, min(default, MAX_THREADS))
    try:
        value = int(raw)
    except ValueError:
        raise ModelLoadError(f"parameter {key} must be an integer, got {raw[:64]!r}") from None
    if not 0 <= value <= MAX_THREADS:
        raise ModelLoadError(f"parameter {key} must be 0..{MAX_THREADS} (0 = the default), got {value}")
    return value or max(1, min(default, MAX_THREADS))


def create(path: Path, config: mc.ModelConfig, plan: InstancePlan, options: ort.SessionOptions) -> ort.InferenceSession:
    """One session on the planned provider, or on CPU with a warning when it is missing."""
    providers = _usable(plan.providers)
    if plan.wanted != CPU and not any((p[0] if isinstance(p, tuple) else p) == plan.wanted for p in providers):
        log.warning(
            "model %s: %s is not available in this ONNX Runtime build (has %s); falling back to CPU",
            config.name or path.parent.parent.name,
            plan.wanted,
            ort.get_available_providers(),
        )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers or [CPU])
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path.parent.name}/{path.name}: {exc}") from None


def warmup_feeds(config: mc.ModelConfig, inputs: dict[str, TensorSpec], model_dir: Path) -> list[tuple[dict, int]]:
    """Warm-up feeds and repeat counts: the config's ``model_warmup``, or else one run of zeros
    at the largest batch size whose inputs fit ``WARMUP_BUDGET_BYTES`` (dynamic dims as 1).

    Declared warm-ups are bounded (``model_config.check_limits``): at most ``MAX_WARMUPS`` of
    them, each repeated at most ``MAX_WARMUP_COUNT`` times, ``batch_size <= max_batch_size``, and
    the inputs of all of them together at most ``WARMUP_MAX_BYTES``. An ``input_data_file`` is a
    regular file inside ``<model>/warmup`` holding exactly the bytes one sample of its input needs
    (``model_files.read_contained``)."""
    batched = config.max_batch_size > 0
    if not config.model_warmup:
        rows = config.max_batch_size if batched else 0
        if batched:  # the largest batch, within a memory budget for the zero inputs
            row_bytes = sum(
                max(1, spec.dtype.itemsize) * int(np.prod(_shape(0, spec.dims))) for spec in inputs.values()
            )
            rows = max(1, min(rows, WARMUP_BUDGET_BYTES // max(1, row_bytes)))
        feeds = {n: _filled(spec.dtype.numpy, _shape(rows, spec.dims), "zero") for n, spec in inputs.items()}
        return [(feeds, 1)]
    runs = []
    size = 0  # over every declared warm-up: they are all held until the runs are done
    for w in config.model_warmup:
        if batched and w.batch_size > config.max_batch_size:
            raise ModelLoadError(
                f"model_warmup '{w.name}': batch_size {w.batch_size} exceeds max_batch_size {config.max_batch_size}"
            )
        rows = max(1, w.batch_size) if batched else 0
        feeds = {}
        for name, spec in inputs.items():
            item = w.inputs.get(name)
            if item is None:
                raise ModelLoadError(f"model_warmup '{w.name}' has no data for input '{name}'")
            shape = _shape(rows, list(item.dims) or spec.dims)
            size += max(1, spec.dtype.itemsize) * int(np.prod(shape, dtype=object))
            if size > WARMUP_MAX_BYTES:
                raise ModelLoadError(
                    f"model_warmup '{w.name}': inputs of {size} bytes exceed the warm-up limit of {WARMUP_MAX_BYTES}"
                )
            kind = item.WhichOneof("input_data_type") or "zero_data"
            if kind == "input_data_file":
                sample = shape[1:] if batched else shape
                arr = _warmup_file(model_dir, w.name, name, item.input_data_file, spec, sample,
                                   WARMUP_MAX_BYTES - size)
                feeds[name] = np.stack([arr] * rows) if batched else arr
            else:
                feeds[name] = _filled(spec.dtype.numpy, shape, "random" if kind == "random_data" else "zero")
        runs.append((feeds, max(1, w.count)))
    return runs


def _warmup_file(model_dir: Path, warmup: str, input_name: str, file_name: str, spec: TensorSpec,
                 sample: list[int], room: int) -> np.ndarray:
    """One sample of an input from ``<model>/warmup/<file_name>``: exactly the bytes it needs (a
    BYTES input: its length-prefixed elements, within the warm-up limit's ``room``)."""
    what = model_files.warmup_what(warmup, input_name)
    needed = int(np.prod(sample, dtype=object)) * spec.dtype.itemsize if spec.dtype.itemsize else max(0, room)
    raw = model_files.read_contained(model_dir / "warmup", file_name, what, needed, where=model_files.WARMUP_DIR)
    try:
        return tensors.decode_raw(input_name, spec.dtype, sample, raw)
    except InvalidInput as exc:
        raise ModelLoadError(f"{what}: {file_name}: {exc.message}") from None


def _shape(rows: int, dims) -> list[int]:
    shape = [d if d > 0 else 1 for d in dims]
    return [rows, *shape] if rows else shape


def _filled(dtype: np.dtype, shape: list[int], kind: str) -> np.ndarray:
    if dtype == np.dtype(object):
        return np.full(shape, "", dtype=object)
    if kind == "random":
        rng = np.random.default_rng(0)
        if dtype.kind == "f":
            return rng.random(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 2, shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)
