"""Model configuration: parse ``config.pbtxt`` and complete it from the ONNX graph.

Completion follows Triton's auto-complete: whatever the file leaves out (or all of it, when
there is no file) is filled from the graph's inputs and outputs. ``max_batch_size`` left out
becomes ``default_max_batch_size`` when every input and output has a dynamic first
dimension, 0 otherwise. Where the file and the graph disagree, :class:`ModelLoadError`
says where.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from onnxgate.core.serving import model_files
from onnxgate.core.serving.batch_policy import default_deadline_ms
from onnxgate.core.serving.tensors import BY_CONFIG, BY_ORT, DataType, element_count
from onnxgate.errors import ModelLoadError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

ModelConfig = mc.ModelConfig

# What one config (config.pbtxt, or a load API override merged over it) may ask for. A config past
# a limit fails that model with a reason naming the limit (400 / INVALID_ARGUMENT from the API).
MAX_INSTANCES = 64  # sessions of one version, over all instance groups
MAX_WARMUPS = 16  # model_warmup entries
MAX_WARMUP_COUNT = 100  # runs of one model_warmup entry on each instance
MAX_PREFERRED_BATCH_SIZES = 64  # dynamic_batching.preferred_batch_size entries
MAX_QUEUE_SIZE = 65536  # dynamic_batching.default_queue_policy.max_queue_size (and each level's)
MAX_PRIORITY_LEVELS = 64  # dynamic_batching.priority_levels
MAX_QUEUE_DELAY_US = 60_000_000  # dynamic_batching.max_queue_delay_microseconds (60 s)


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """An input or output as ONNX Runtime describes it: type string and shape."""

    name: str
    ort_type: str
    shape: tuple[int | str | None, ...]

    @property
    def dims(self) -> tuple[int, ...]:
        """Shape with every symbolic or unknown dimension as -1."""
        return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in self.shape)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A served tensor: datatype and dims *without* the batch dimension."""

    name: str
    dtype: DataType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None  # the config's ``reshape``: the dims ONNX Runtime sees

    def shape(self, batched: bool) -> list[int]:
        """The shape clients see in metadata: batch dimension first as -1 when batching."""
        return [-1, *self.dims] if batched else list(self.dims)


def parse_pbtxt(text: str, origin: str = "config.pbtxt") -> mc.ModelConfig:
    """Parse Triton's text format into a ModelConfig."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{origin}: {exc}") from None
    return config


def read_pbtxt(path: Path) -> mc.ModelConfig:
    """Read and parse a config.pbtxt file: a regular file inside its model directory, of at most
    ``model_files.MAX_CONFIG_BYTES``."""
    return parse_pbtxt(model_files.read_config_file(path.parent, path.name), path.name)


def parse_json(text: str) -> mc.ModelConfig:
    """Parse a ModelConfig given as JSON (the repository load API's ``config`` parameter)."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ModelLoadError(f"config override: {exc}") from None
    return config


def check_limits(config: mc.ModelConfig) -> None:
    """Refuse what would cost unbounded resources: too many instances, warm-ups or warm-up runs,
    preferred batch sizes, queued requests, or a batch delay past a minute; and any file name
    that could leave the model directory (``model_files.check_names``). Cheap: no file is read."""
    groups = list(config.instance_group)
    if any(g.count < 0 for g in groups):
        raise ModelLoadError(f"instance_group count must be >= 0, got {min(g.count for g in groups)}")
    total = sum(max(1, g.count) for g in groups)
    if total > MAX_INSTANCES:
        raise ModelLoadError(f"instance_group asks for {total} instances; 1..{MAX_INSTANCES} are allowed")
    if len(config.model_warmup) > MAX_WARMUPS:
        raise ModelLoadError(f"model_warmup has {len(config.model_warmup)} entries; at most {MAX_WARMUPS} are allowed")
    for w in config.model_warmup:
        if w.count > MAX_WARMUP_COUNT:
            raise ModelLoadError(
                f"model_warmup '{w.name}': count {w.count} is over the limit of {MAX_WARMUP_COUNT} runs"
            )
    db = config.dynamic_batching
    if len(db.preferred_batch_size) > MAX_PREFERRED_BATCH_SIZES:
        raise ModelLoadError(
            f"dynamic_batching has {len(db.preferred_batch_size)} preferred_batch_size entries; "
            f"at most {MAX_PREFERRED_BATCH_SIZES} are allowed"
        )
    if any(p < 1 for p in db.preferred_batch_size):
        raise ModelLoadError(f"dynamic_batching preferred_batch_size must be >= 1, got {list(db.preferred_batch_size)}")
    _check_queue_policies(db)
    try:
        default_deadline_ms(config)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if db.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US:
        raise ModelLoadError(
            f"dynamic_batching max_queue_delay_microseconds {db.max_queue_delay_microseconds} is over the limit "
            f"of {MAX_QUEUE_DELAY_US} (60 s)"
        )
    model_files.check_names(config)


def _check_queue_policies(db: mc.ModelDynamicBatching) -> None:
    """Priority levels and queue policies as Triton defines them, within our bounds."""
    if db.priority_levels > MAX_PRIORITY_LEVELS:
        raise ModelLoadError(
            f"dynamic_batching priority_levels {db.priority_levels} is over the limit of {MAX_PRIORITY_LEVELS}"
        )
    if db.priority_levels and not 1 <= db.default_priority_level <= db.priority_levels:
        raise ModelLoadError(
            f"dynamic_batching default_priority_level must be 1..{db.priority_levels} (priority_levels), "
            f"got {db.default_priority_level}"
        )
    for level in db.priority_queue_policy:
        if not 1 <= level <= db.priority_levels:
            raise ModelLoadError(
                f"dynamic_batching priority_queue_policy has level {level}; priority_levels is {db.priority_levels}"
            )
    policies = [("default_queue_policy", db.default_queue_policy)]
    policies += [(f"priority_queue_policy[{lv}]", qp) for lv, qp in db.priority_queue_policy.items()]
    for where, qp in policies:
        if qp.max_queue_size > MAX_QUEUE_SIZE:
            raise ModelLoadError(
                f"dynamic_batching {where} max_queue_size {qp.max_queue_size} is over the limit of "
                f"{MAX_QUEUE_SIZE} requests"
            )


def _first_dim_dynamic(t: GraphTensor) -> bool:
    return len(t.dims) >= 1 and t.dims[0] == -1


def complete(
    config: mc.ModelConfig,
    name: str,
    graph_inputs: Sequence[GraphTensor],
    graph_outputs: Sequence[GraphTensor],
    default_max_batch_size: int,
) -> mc.ModelConfig:
    """Return a copy of ``config`` completed from the graph; raise where they disagree."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    if out.name and out.name != name:
        raise ModelLoadError(f"config name '{out.name}' does not match model directory '{name}'")
    out.name = name
    out.platform = out.platform or "onnxruntime_onnx"
    if out.platform != "onnxruntime_onnx":
        raise ModelLoadError(f"platform '{out.platform}' is not served; onnxgate serves onnxruntime_onnx")
    out.backend = out.backend or "onnxruntime"
    scheduler = out.WhichOneof("scheduling_choice")
    if scheduler in ("sequence_batching", "ensemble_scheduling"):
        # Served as stateless it would answer wrongly: sequence_id/start/end would be ignored,
        # requests of one sequence batched with others'.
        raise ModelLoadError(f"{scheduler} is not supported: onnxgate serves stateless models only")

    served_outputs = [t for t in graph_outputs if t.ort_type in BY_ORT]
    for t in graph_outputs:
        if t.ort_type not in BY_ORT:
            log.warning("model %s: output '%s' of type %s is not served", name, t.name, t.ort_type)
    for t in graph_inputs:
        if t.ort_type not in BY_ORT:
            raise ModelLoadError(f"input '{t.name}' has type {t.ort_type}, which onnxgate cannot feed")

    everything = [*graph_inputs, *served_outputs]
    if out.HasField("max_batch_size"):
        if out.max_batch_size < 0:
            raise ModelLoadError(f"max_batch_size must be >= 0, got {out.max_batch_size}")
        if out.max_batch_size > 0:
            for t in everything:
                if not _first_dim_dynamic(t):
                    raise ModelLoadError(
                        f"max_batch_size {out.max_batch_size} needs a dynamic first dimension, "
                        f"but '{t.name}' has shape {list(t.dims)} in the model"
                    )
    else:
        batchable = bool(everything) and all(_first_dim_dynamic(t) for t in everything)
        out.max_batch_size = default_max_batch_size if batchable else 0
    batched = out.max_batch_size > 0

    _complete_tensors(out.input, graph_inputs, batched, "input", mc.ModelInput)
    _complete_tensors(out.output, served_outputs, batched, "output", mc.ModelOutput)
    switch = out.parameters["dynamic_batching"].string_value if "dynamic_batching" in out.parameters else ""
    if batched and out.WhichOneof("scheduling_choice") is None and switch.lower() not in ("off", "false", "0", "no"):
        out.dynamic_batching.SetInParent()
    too_big = [p for p in out.dynamic_batching.preferred_batch_size if batched and p > out.max_batch_size]
    if too_big:
        raise ModelLoadError(
            f"dynamic_batching preferred_batch_size {too_big} exceeds max_batch_size {out.max_batch_size}"
        )
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    if not out.instance_group:
        group = out.instance_group.add()
        group.count = 1
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    return out


def _complete_tensors(listed, graph: Sequence[GraphTensor], batched: bool, what: str, factory) -> None:
    by_name = {t.name: t for t in graph}
    seen: set[str] = set()
    for entry in listed:
        t = by_name.get(entry.name)
        if t is None:
            raise ModelLoadError(f"config {what} '{entry.name}' is not in the model; model {what}s: {sorted(by_name)}")
        if entry.name in seen:
            raise ModelLoadError(f"config lists {what} '{entry.name}' twice")
        seen.add(entry.name)
        graph_type = BY_ORT[t.ort_type]
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = mc.DataType.Value(graph_type.config)
        elif mc.DataType.Name(entry.data_type) != graph_type.config:
            raise ModelLoadError(
                f"config {what} '{entry.name}' has data_type {mc.DataType.Name(entry.data_type)}, "
                f"the model has {graph_type.config}"
            )
        graph_dims = t.dims[1:] if batched else t.dims
        if entry.HasField("reshape"):
            _check_reshape(entry, graph_dims, what)
            continue
        if not entry.dims:
            entry.dims.extend(graph_dims)
            continue
        if len(entry.dims) != len(graph_dims):
            raise ModelLoadError(
                f"config {what} '{entry.name}' has dims {list(entry.dims)}, "
                f"the model has {list(graph_dims)}" + (" (without the batch dimension)" if batched else "")
            )
        merged = []
        for c, g in zip(entry.dims, graph_dims, strict=True):
            if c != -1 and g != -1 and c != g:
                raise ModelLoadError(
                    f"config {what} '{entry.name}' has dims {list(entry.dims)}, the model has {list(graph_dims)}"
                )
            merged.append(c if c != -1 else g)
        del entry.dims[:]
        entry.dims.extend(merged)
    for t in graph:
        if t.name not in seen:
            entry = listed.add()
            entry.name = t.name
            entry.data_type = mc.DataType.Value(BY_ORT[t.ort_type].config)
            entry.dims.extend(t.dims[1:] if batched else t.dims)


def _check_reshape(entry, graph_dims: Sequence[int], what: str) -> None:
    """``reshape`` (as Triton): clients send and get ``dims``; ONNX Runtime sees ``reshape.shape``,
    which must agree with the graph, and both must hold as many elements (one variable dim each
    at most, so that one reshape of the batch fits every request)."""
    dims, shape = list(entry.dims), list(entry.reshape.shape)
    if not dims:
        raise ModelLoadError(f"config {what} '{entry.name}' has a reshape but no dims")
    agree = len(shape) == len(graph_dims) and all(
        r == -1 or g == -1 or r == g for r, g in zip(shape, graph_dims, strict=True)
    )
    if not agree:
        raise ModelLoadError(f"config {what} '{entry.name}' has reshape {shape}, the model has {list(graph_dims)}")
    if sum(d == -1 for d in dims) > 1 or sum(d == -1 for d in shape) > 1 or (-1 in dims) != (-1 in shape):
        raise ModelLoadError(
            f"config {what} '{entry.name}': dims {dims} and reshape {shape} may have one variable dimension "
            "each, and only together"
        )
    fixed = [d for d in dims if d != -1]
    fixed_shape = [d for d in shape if d != -1]
    if -1 not in dims and element_count(fixed) != element_count(fixed_shape):
        raise ModelLoadError(
            f"config {what} '{entry.name}': dims {dims} and reshape {shape} hold different element counts"
        )


def tensor_specs(entries) -> list[TensorSpec]:
    """Served tensor specs from a completed config's input or output list."""
    specs = []
    for e in entries:
        dtype = BY_CONFIG.get(mc.DataType.Name(e.data_type))
        if dtype is None:
            raise ModelLoadError(f"'{e.name}' has data_type {mc.DataType.Name(e.data_type)}, which is not served")
        reshape = tuple(int(d) for d in e.reshape.shape) if e.HasField("reshape") else None
        specs.append(TensorSpec(e.name, dtype, tuple(int(d) for d in e.dims), reshape))
    return specs


def select_versions(config: mc.ModelConfig, available: Sequence[int]) -> list[int]:
    """Versions to serve under the config's version policy, highest first."""
    ordered = sorted(set(available), reverse=True)
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return ordered
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in ordered if v in wanted]
    n = policy.latest.num_versions if kind == "latest" else 1
    return ordered[: max(n, 1)]
