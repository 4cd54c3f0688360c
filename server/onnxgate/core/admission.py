"""What a request may cost before it is queued: its size bound, and the gateway's decode budget.

Every infer request is looked up first and bounded by what its model can accept, before its body
is read (HTTP) or decoded (gRPC): a model whose inputs all have fixed dims and fixed-size
datatypes takes at most ``max_batch_size x elements per row`` elements
(:attr:`ModelVersion.max_request_elements`), so no valid request for it is larger than a small
multiple of that (the wire format's bytes per element, see the front ends' codecs). Models with
variable dims or BYTES inputs are bounded by the transport's limit.

Then the request holds a share of one gateway-wide :class:`DecodeBudget` (bytes being read,
inflated and decoded right now) until it is decoded; past the budget it is refused at once
(429 / RESOURCE_EXHAUSTED, ``reason="decode_budget"``). Decoding a large body runs in a small
thread pool, so that no single request holds the event loop for more than a few milliseconds
(the decoders hold the GIL, but the loop gets it back every switch interval). Replies are
encoded the same way: a large one (a BYTES output of a million strings, say) off the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from onnxgate.errors import Overloaded

T = TypeVar("T")

INLINE_DECODE_BYTES = 256 * 1024  # smaller bodies decode on the loop (a few hundred µs at most)
DECODE_THREADS = 2


class DecodeBudget:
    """Bytes being read and decoded by every request at once, bounded; decoding off the loop."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._pool: ThreadPoolExecutor | None = None

    def hold(self, nbytes: int, on_shed: Callable[[Overloaded], object] | None = None) -> Hold:
        """``with budget.hold(n):`` holds ``n`` bytes for the block; Overloaded at once (after
        ``on_shed`` counted it) when the budget is spent. A request larger than the whole budget
        passes only when nothing else holds any (the transport's own limit bounds it)."""
        return Hold(self, nbytes, on_shed)

    def _take(self, nbytes: int, on_shed: Callable[[Overloaded], object] | None, own: int = 0) -> None:
        """Take ``nbytes`` for a holder already holding ``own``: refused when others hold some
        and the total would pass the limit."""
        if nbytes and self.used > own and self.used + nbytes > self.limit:
            exc = Overloaded(
                f"the gateway is decoding {self.used} bytes of requests (limit {self.limit}); retry shortly",
                reason="decode_budget",
            )
            if on_shed is not None:
                on_shed(exc)
            raise exc
        self.used += nbytes

    async def offload(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a codec step over ``nbytes`` of data (decoding a request, encoding or
        compressing a reply): inline when small, else in the pool. (Hot paths test the size
        first and call small ones directly, sparing the coroutine.)"""
        if nbytes < INLINE_DECODE_BYTES:
            return fn(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="onnxgate-decode")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Hold:
    __slots__ = ("_budget", "_nbytes", "_on_shed")

    def __init__(self, budget: DecodeBudget, nbytes: int, on_shed: Callable[[Overloaded], object] | None) -> None:
        self._budget, self._nbytes, self._on_shed = budget, nbytes, on_shed

    def __enter__(self) -> Hold:
        self._budget._take(self._nbytes, self._on_shed)
        return self

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more (a body's next chunk as it arrives); Overloaded when spent."""
        self._budget._take(nbytes, self._on_shed, self._nbytes)
        self._nbytes += nbytes

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._budget.used -= self._nbytes
