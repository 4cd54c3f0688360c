"""What a version's executions cost, learned online: the deadline scheduler's predictions.

:class:`ExecTimeModel` fits a batch's execution time (joining the inputs, ONNX Runtime, cutting
the outputs: the time an instance is busy with it) as ``fixed + per_row * rows`` by exponentially
weighted least squares over the recent executions, refreshed by every execution the batcher
records. A prediction adds a margin of the recent mean absolute deviation from the fit, so that
a refusal means the deadline could not be met, not that it was on the edge. Before enough
executions of at least two sizes have been seen the fit is proportional (no fixed cost) and,
before any, there is none: nothing is refused on a guess.

:class:`ArrivalRate` is the rows per second arriving, smoothed, for the adaptive delay.
"""

from __future__ import annotations

import math

MIN_EXECUTIONS = 3  # executions seen before the scheduler trusts the fit
HALF_LIFE = 32.0  # executions after which one's weight in the fit has halved
DEVIATION_HALF_LIFE = 16.0  # the same for the margin: it follows the recent noise
DEVIATIONS = 2.0  # margin: this many mean absolute deviations on top of the fit


class ExecTimeModel:
    """``fixed_ns + per_row_ns * rows`` for a version's batches (see the module doc).

    Written on the event loop only (one execution at a time); read from any thread, through
    :attr:`fit`, a tuple replaced whole."""

    __slots__ = ("_decay", "_dev", "_dev_decay", "_w", "_wr", "_wrr", "_wry", "_wy", "count", "fit")

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        self._decay = 0.5 ** (1.0 / half_life)
        self._dev_decay = 0.5 ** (1.0 / DEVIATION_HALF_LIFE)
        self._w = self._wr = self._wrr = self._wy = self._wry = 0.0
        self._dev = 0.0
        self.count = 0
        self.fit: tuple[float, float, float] | None = None  # (fixed_ns, per_row_ns, margin_ns)

    def observe(self, rows: int, ns: int) -> None:
        """One execution of ``rows`` rows that kept an instance busy ``ns`` nanoseconds."""
        if rows <= 0 or ns <= 0:
            return
        d = self._decay
        if self.fit is not None:  # how far this execution is from what the fit predicted
            fixed, per_row, _ = self.fit
            dd = self._dev_decay
            self._dev = dd * self._dev + (1 - dd) * abs(ns - (fixed + per_row * rows))
        self._w = d * self._w + 1.0
        self._wr = d * self._wr + rows
        self._wrr = d * self._wrr + rows * rows
        self._wy = d * self._wy + ns
        self._wry = d * self._wry + rows * ns
        self.count += 1
        self.fit = self._solve()

    def _solve(self) -> tuple[float, float, float]:
        w, wr, wrr, wy, wry = self._w, self._wr, self._wrr, self._wy, self._wry
        mean_r, mean_y = wr / w, wy / w
        var_r = wrr / w - mean_r * mean_r
        if var_r > 0.05 * mean_r * mean_r + 1e-9:  # sizes spread enough for a slope
            per_row = (wry / w - mean_r * mean_y) / var_r
            fixed = mean_y - per_row * mean_r
            if per_row < 0:  # noise: bigger batches do not cost less
                fixed, per_row = mean_y, 0.0
            elif fixed < 0:
                fixed, per_row = 0.0, mean_y / mean_r
        else:
            fixed, per_row = 0.0, mean_y / mean_r
        return fixed, per_row, DEVIATIONS * self._dev

    def predict_ns(self, rows: int) -> int:
        """Predicted busy time of a batch of ``rows`` rows, with its margin; 0 when untrained."""
        fit = self.fit
        if fit is None or self.count < MIN_EXECUTIONS:
            return 0
        fixed, per_row, margin = fit
        return int(fixed + per_row * rows + margin)

    @property
    def margin_ns(self) -> int:
        """The prediction's margin (0 when untrained)."""
        fit = self.fit
        return int(fit[2]) if fit is not None and self.count >= MIN_EXECUTIONS else 0

    @property
    def trained(self) -> bool:
        return self.fit is not None and self.count >= MIN_EXECUTIONS


class ArrivalRate:
    """Rows arriving per nanosecond, smoothed over about ``window_ns``; updated on the loop."""

    __slots__ = ("_rows", "_since", "_window", "per_ns")

    def __init__(self, window_ns: int = 1_000_000_000) -> None:
        self._window = window_ns
        self._since = 0
        self._rows = 0
        self.per_ns = 0.0

    def arrived(self, rows: int, now: int) -> None:
        """``rows`` arrived at ``now``: counted, and the rate refreshed once per 1 ms."""
        self._rows += rows
        elapsed = now - self._since
        if elapsed >= 1_000_000:
            if self._since:
                alpha = 1.0 - math.exp(-elapsed / self._window)
                self.per_ns += alpha * (self._rows / elapsed - self.per_ns)
            self._since, self._rows = now, 0
