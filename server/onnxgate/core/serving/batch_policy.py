"""How a version's queue is bounded and its batches formed: the batch policy a completed
ModelConfig asks for (Triton's ``dynamic_batching`` and its default queue policy)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxgate_client.pb import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a version's queue is bounded and its batches formed."""

    enabled: bool = False
    max_batch_size: int = 1
    max_queue_delay_ns: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    max_queue_bytes: int = 0  # 0 = no byte bound
    default_timeout_ns: int = 0  # 0 = no timeout
    allow_timeout_override: bool = True


def policy_from_config(
    config: mc.ModelConfig, default_max_queue_size: int = 1024, max_queue_bytes: int = 0
) -> BatchPolicy:
    """The batch policy a completed ModelConfig asks for.

    Dynamic batching is on for every model with ``max_batch_size > 0`` unless the config's
    parameters say ``dynamic_batching: "off"``. Without a queue policy the queue holds
    ``default_max_queue_size`` requests and a request's own ``timeout`` is honoured; with a
    ``default_timeout_microseconds``, a request may only shorten it, and only when
    ``allow_timeout_override`` is set.
    """
    db = config.dynamic_batching
    qp = db.default_queue_policy
    switch = config.parameters["dynamic_batching"].string_value if "dynamic_batching" in config.parameters else ""
    enabled = config.max_batch_size > 0 and switch.lower() not in ("off", "false", "0", "no")
    return BatchPolicy(
        enabled=enabled,
        max_batch_size=max(1, config.max_batch_size),
        max_queue_delay_ns=db.max_queue_delay_microseconds * 1000,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_size=qp.max_queue_size or default_max_queue_size,
        max_queue_bytes=max_queue_bytes,
        default_timeout_ns=qp.default_timeout_microseconds * 1000,
        allow_timeout_override=qp.allow_timeout_override,
    )
