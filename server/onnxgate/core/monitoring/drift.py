"""Live drift: the ``drift:`` section, and the monitor that runs every configured model's window.

:class:`DriftMonitor` holds one :class:`~onnxgate.core.monitoring.drift_live.LiveDrift` per
model of ``drift.models`` (``drift_live``: the window, the statistics against the reference, the
Prometheus gauges and the webhook), feeds it the inputs the sample logger observes, computes
every model off the event loop every ``interval_s``, and renders a model's HTML report off the
loop, one at a time (``GET /v2/drift/{model}/report``). Config (gateway.yaml)::

    drift:
      interval_s: 30
      webhook: http://alerts.local/drift          # default for every model
      models:
        fraud: {reference: ./train.parquet, window: 5000, psi_threshold: 0.2}
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from onnxgate.core.monitoring.drift_live import DriftMetrics, LiveDrift
from onnxgate.core.monitoring.drift_stats import DriftDataError, FeatureDrift, Thresholds, load_features
from onnxgate.core.sections import check, parse_fields
from onnxgate.errors import ModelNotFound, Overloaded, Unavailable, Unsupported

log = logging.getLogger("onnxgate.drift")


@dataclass(frozen=True, slots=True)
class ModelDriftConfig:
    """``drift.models.<name>``."""

    reference: str = ""  # training data (Parquet, CSV, NPZ) or a sample-log directory
    window: int = 5000  # rows of recent inputs compared
    min_rows: int = 500  # no gauges until the window holds this many rows
    psi_threshold: float = 0.2
    ks_pvalue: float | None = None  # also alert when the KS p-value falls below this
    chi2_pvalue: float | None = None
    bins: int = 10
    webhook: str = ""  # empty: drift.webhook


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """The ``drift:`` section."""

    interval_s: float = 30.0
    webhook: str = ""
    models: Mapping[str, ModelDriftConfig] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftConfig:
        """Parse the section; raises ``ConfigError``."""
        check(isinstance(d, Mapping), f"section 'drift' must be a mapping, got {type(d).__name__}")
        values = parse_fields(cls, {k: v for k, v in d.items() if k != "models"}, "drift")
        models = d.get("models") or {}
        check(isinstance(models, Mapping), "drift.models must map model names to {reference: PATH, ...}")
        parsed = {}
        for name, spec in models.items():
            where = f"drift.models.{name}"
            c = ModelDriftConfig(**parse_fields(ModelDriftConfig, spec, where))
            check(bool(c.reference), f"{where}.reference is required")
            check(
                c.window >= 2 and 1 <= c.min_rows <= c.window, f"{where}: need window >= 2 and 1 <= min_rows <= window"
            )
            check(c.bins >= 2 and c.psi_threshold > 0, f"{where}: bins must be >= 2 and psi_threshold > 0")
            check(
                not c.webhook or c.webhook.startswith(("http://", "https://")),
                f"{where}.webhook must be an http(s) URL",
            )
            parsed[str(name)] = c
        missing = [m for m in ("scipy", "pyarrow") if parsed and importlib.util.find_spec(m) is None]
        check(not missing, f"drift needs {' and '.join(missing)}: pip install 'onnxgate[drift]'")
        c = cls(models=MappingProxyType(parsed), **values)
        check(c.interval_s > 0, f"drift.interval_s must be positive, got {c.interval_s}")
        check(not c.webhook or c.webhook.startswith(("http://", "https://")), "drift.webhook must be an http(s) URL")
        return c


class DriftMonitor:
    """Every configured model's LiveDrift, and the owned task that computes them periodically."""

    def __init__(self, config: DriftConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.metrics = DriftMetrics(registry)
        self.models: dict[str, LiveDrift] = {}
        self.disabled: dict[str, str] = {}  # model -> why its reference could not be used
        self._task: asyncio.Task | None = None
        self._rendering = False  # a report is being rendered (one at a time per process)

    async def start(self) -> None:
        """Load the references (off the loop) and start computing every ``interval_s``."""
        for name, c in self.config.models.items():
            try:
                table = await asyncio.to_thread(load_features, c.reference, name)
            except DriftDataError as exc:
                log.error("drift: model %s disabled: %s", name, exc)
                self.disabled[name] = str(exc)
                continue
            self.models[name] = LiveDrift(
                name,
                table,
                metrics=self.metrics,
                window=c.window,
                min_rows=c.min_rows,
                thresholds=Thresholds(c.psi_threshold, c.ks_pvalue, c.chi2_pvalue),
                bins=c.bins,
                webhook=c.webhook or self.config.webhook,
                reference_label=Path(c.reference).name,
            )
        self._task = asyncio.create_task(self._loop(), name="onnxgate-drift")

    def observe(self, model: str, inputs: Mapping[str, np.ndarray]) -> None:
        """Feed one request's inputs (a SampleLogger observer); no-op for models without drift."""
        live = self.models.get(model)
        if live is not None:
            live.observe(inputs)

    def compute(self) -> dict[str, dict[str, FeatureDrift]]:
        """Compute every model now (blocking)."""
        out = {}
        for name, live in self.models.items():
            try:
                out[name] = live.compute()
            except Exception:
                log.exception("drift: computing model %s failed", name)
        return out

    def thresholds(self) -> dict[str, dict[str, Any]]:
        """Each configured model's thresholds and window, as ``drift.models`` sets them."""
        return {name: {"psi_threshold": c.psi_threshold, "ks_pvalue": c.ks_pvalue, "chi2_pvalue": c.chi2_pvalue,
                       "min_rows": c.min_rows, "window": c.window}
                for name, c in self.config.models.items()}

    async def report(self, model: str) -> str:
        """The HTML report of ``model``'s live window, rendered in a thread (never on the loop),
        one render at a time: a call while another renders is refused (``Overloaded``, 429).
        ``ModelNotFound`` (404) for a model without drift, ``Unavailable`` (503) while its window
        is short of ``min_rows`` or its reference is unusable, ``Unsupported`` (501) without matplotlib."""
        live = self.models.get(model)
        if live is None:
            if model in self.disabled:
                raise Unavailable(f"drift of model '{model}' is disabled: {self.disabled[model]}")
            raise ModelNotFound(f"model '{model}' has no live drift (drift.models in the config)")
        if importlib.util.find_spec("matplotlib") is None:
            raise Unsupported("the drift report needs matplotlib: pip install 'onnxgate[drift]'")
        if self._rendering:
            raise Overloaded("a drift report is being rendered; retry in a moment", 1.0, "report_in_progress")
        self._rendering = True
        try:
            return await asyncio.to_thread(live.report)
        finally:
            self._rendering = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            await asyncio.to_thread(self.compute)

    async def close(self) -> None:
        """Stop the periodic task and wait for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
