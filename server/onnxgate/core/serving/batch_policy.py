"""How a version's queue is bounded, ordered and its batches formed: the batch policy a
completed ModelConfig asks for (Triton's ``dynamic_batching``: its queue policies and priority
levels), and the per-model default deadline.

Priority levels are Triton's: with ``priority_levels: N``, a request's ``priority`` parameter
picks level 1 (the highest) to N; 0, an absent parameter or one past N means
``default_priority_level``. Each level has its queue policy (``priority_queue_policy[level]``,
else ``default_queue_policy``): a queue size bound, a default timeout, whether a request may
shorten it, and what a timed-out request gets (REJECT: refused; DELAY: it waits behind every
request of its level that has not timed out). Shadow copies form one more level, below all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from onnxgate.core.inference import MAX_DEADLINE_MS
from onnxgate.errors import InvalidInput
from onnxgate_client.pb import model_config_pb2 as mc

#: The model config parameter of a model's default deadline (milliseconds from receipt) for
#: requests whose caller set none.
DEADLINE_PARAMETER = "default_deadline_ms"

SCHEDULERS = ("deadline", "fifo")


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """One priority level's queue policy (Triton's ModelQueuePolicy)."""

    max_queue_size: int = 0  # 0 = only the version's overall bound
    default_timeout_ns: int = 0  # 0 = no timeout
    allow_timeout_override: bool = True
    delay_on_timeout: bool = False  # timeout_action DELAY rather than REJECT


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a version's queue is bounded and ordered and its batches formed."""

    enabled: bool = False
    max_batch_size: int = 1
    max_queue_delay_ns: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024  # every level together (shadows included)
    max_queue_bytes: int = 0  # 0 = no byte bound
    default_timeout_ns: int = 0  # 0 = no timeout (the default level's, kept for callers that read it)
    allow_timeout_override: bool = True
    priority_levels: int = 1  # levels 1..priority_levels; shadows are at priority_levels + 1
    default_priority_level: int = 1
    levels: tuple[QueuePolicy, ...] = (QueuePolicy(), QueuePolicy(), QueuePolicy())  # indexed by level, 0 unused
    default_deadline_ns: int = 0  # 0 = no default deadline
    deadline_aware: bool = True  # False: the scheduler is off (scheduler: fifo)

    @property
    def shadow_level(self) -> int:
        return self.priority_levels + 1

    def level(self, priority: object) -> int:
        """The level a request's ``priority`` parameter (None when absent) puts it at; as in
        Triton, 0 or one past the last level means the default level."""
        if priority is None:
            return self.default_priority_level
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise InvalidInput(f"parameter 'priority' must be an unsigned integer, got {priority!r:.40}")
        if priority == 0 or priority > self.priority_levels:
            return self.default_priority_level
        return priority

    def timeout_ns(self, level: int, asked_us: int | None) -> int:
        """The queue timeout of a request at ``level`` that asked for ``asked_us`` (or not)."""
        qp = self.levels[level]
        timeout_ns = qp.default_timeout_ns
        if asked_us and (not timeout_ns or qp.allow_timeout_override):
            timeout_ns = asked_us * 1000 if not timeout_ns else min(timeout_ns, asked_us * 1000)
        return timeout_ns


def _queue_policy(qp: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        max_queue_size=qp.max_queue_size,
        default_timeout_ns=qp.default_timeout_microseconds * 1000,
        allow_timeout_override=qp.allow_timeout_override,
        delay_on_timeout=qp.timeout_action == mc.ModelQueuePolicy.DELAY,
    )


def default_deadline_ms(config: mc.ModelConfig) -> float:
    """The model's default deadline in milliseconds (0 = none), from its config parameter;
    ValueError when it is not a number of 0..MAX_DEADLINE_MS."""
    if DEADLINE_PARAMETER not in config.parameters:
        return 0.0
    text = config.parameters[DEADLINE_PARAMETER].string_value.strip()
    value = float(text)
    if not 0 <= value <= MAX_DEADLINE_MS:  # NaN fails too
        raise ValueError(f"parameter {DEADLINE_PARAMETER} must be 0..{MAX_DEADLINE_MS} ms, got {text!r:.40}")
    return value


def policy_from_config(
    config: mc.ModelConfig, default_max_queue_size: int = 1024, max_queue_bytes: int = 0, scheduler: str = "deadline"
) -> BatchPolicy:
    """The batch policy a completed (and checked) ModelConfig asks for.

    Dynamic batching is on for every model with ``max_batch_size > 0`` unless the config's
    parameters say ``dynamic_batching: "off"``. Without a queue policy the queue holds
    ``default_max_queue_size`` requests and a request's own ``timeout`` is honoured; with a
    ``default_timeout_microseconds``, a request may only shorten it, and only when
    ``allow_timeout_override`` is set. With priority levels, ``default_queue_policy``'s
    ``max_queue_size`` bounds all levels together (Triton bounds each level by it): a full queue
    makes room for a request by shedding one of a lower level; a level with its own entry in
    ``priority_queue_policy`` is bounded by that entry's size too. ``scheduler="fifo"`` turns deadline ordering,
    predictive admission, late drops and the adaptive delay off.
    """
    db = config.dynamic_batching
    qp = db.default_queue_policy
    switch = config.parameters["dynamic_batching"].string_value if "dynamic_batching" in config.parameters else ""
    enabled = config.max_batch_size > 0 and switch.lower() not in ("off", "false", "0", "no")
    n = max(1, db.priority_levels)
    default_level = db.default_priority_level if db.priority_levels else 1
    # The default policy's queue size bounds the whole queue; a level bounded on its own has
    # an entry of its own in priority_queue_policy.
    default = dataclasses.replace(_queue_policy(qp), max_queue_size=0)
    per_level = tuple(
        _queue_policy(db.priority_queue_policy[lv]) if lv in db.priority_queue_policy else default
        for lv in range(1, n + 1)
    )
    levels = (default, *per_level, default)  # index 0 unused; n + 1 = shadows
    return BatchPolicy(
        enabled=enabled,
        max_batch_size=max(1, config.max_batch_size),
        max_queue_delay_ns=db.max_queue_delay_microseconds * 1000,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_size=qp.max_queue_size or default_max_queue_size,
        max_queue_bytes=max_queue_bytes,
        default_timeout_ns=default.default_timeout_ns,
        allow_timeout_override=default.allow_timeout_override,
        priority_levels=n,
        default_priority_level=default_level,
        levels=levels,
        default_deadline_ns=int(default_deadline_ms(config) * 1e6),
        deadline_aware=scheduler == "deadline",
    )
