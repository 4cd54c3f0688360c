"""Model lifecycle: load the repository, keep each version's state, find what serves a call.

Loading happens in worker threads, never on the event loop. A new set of versions replaces the
old one in a single assignment; the replaced versions drain their queued and running work
before their sessions are released.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from onnxgate.core import model_config
from onnxgate.core.batcher import Batcher, policy_from_config
from onnxgate.core.metrics import Metrics
from onnxgate.core.model import LoadOptions, ModelVersion
from onnxgate.core.repository import ModelSource, Repository
from onnxgate.core.stats import VersionStats
from onnxgate.errors import GatewayError, ModelLoadError, ModelNotFound, Unavailable
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"


@dataclass(slots=True)
class VersionEntry:
    """One version of a model: its state and, when ready, what runs it."""

    version: int
    state: str
    reason: str = ""
    model: ModelVersion | None = None
    scheduler: Batcher | None = None
    stats: VersionStats | None = None


@dataclass(slots=True)
class ModelEntry:
    """A model and its versions, as last (re)loaded."""

    name: str
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    reason: str = ""  # model-level failure (bad config, no versions)

    def ready_versions(self) -> list[VersionEntry]:
        return sorted((v for v in self.versions.values() if v.state == READY), key=lambda v: v.version, reverse=True)


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One row of the repository index."""

    name: str
    version: str
    state: str
    reason: str


class ModelManager:
    """Owns every model entry; the only writer of their states."""

    def __init__(
        self,
        repository: Repository,
        options: LoadOptions,
        metrics: Metrics | None = None,
    ) -> None:
        self.repository = repository
        self.options = options
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()
        self.metrics = metrics or Metrics()

    # -- lookups (event loop, no blocking) -------------------------------------------------
    def get(self, name: str, version: str = "") -> VersionEntry:
        """The ready version serving ``name`` (the highest when ``version`` is empty)."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{name}'")
        if version:
            if not version.isdigit():
                raise ModelNotFound(f"unknown version '{version}' of model '{name}': versions are integers")
            ver = entry.versions.get(int(version))
            if ver is None:
                raise ModelNotFound(f"unknown version {version} of model '{name}'")
            if ver.state != READY:
                raise Unavailable(f"model '{name}' version {version} is not ready: {ver.reason or ver.state}")
            return ver
        ready = entry.ready_versions()
        if not ready:
            reason = entry.reason or "; ".join(
                f"version {v.version}: {v.reason or v.state}" for v in entry.versions.values()
            )
            raise Unavailable(f"model '{name}' has no ready version" + (f" ({reason})" if reason else ""))
        return ready[0]

    def index(self, ready_only: bool = False) -> list[IndexRow]:
        """Every model and version the gateway knows, with state and reason."""
        rows: list[IndexRow] = []
        for name in sorted(self.models):
            entry = self.models[name]
            if not entry.versions:
                rows.append(IndexRow(name, "", UNAVAILABLE, entry.reason))
            for v in sorted(entry.versions):
                ver = entry.versions[v]
                rows.append(IndexRow(name, str(v), ver.state, ver.reason))
        if ready_only:
            rows = [r for r in rows if r.state == READY]
        return rows

    def all_stats(self) -> list[VersionStats]:
        return [
            v.stats
            for name in sorted(self.models)
            for _, v in sorted(self.models[name].versions.items())
            if v.stats is not None
        ]

    # -- lifecycle ----------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every model of the repository; failures are recorded, never raised."""
        sources = await asyncio.to_thread(self.repository.scan)
        await asyncio.gather(*(self.load(name, source=src) for name, src in sources.items()))

    async def load(
        self, name: str, override: mc.ModelConfig | None = None, source: ModelSource | None = None
    ) -> ModelEntry:
        """(Re)load a model from the repository; the old versions serve until the new are ready."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            if source is None:
                source = await asyncio.to_thread(self.repository.find, name)
            if source is None:
                raise ModelNotFound(f"model '{name}' is not in the repository")
            entry = self.models.get(name)
            if entry is None:
                entry = self.models[name] = ModelEntry(name)
            new = await asyncio.to_thread(self._load_versions, source, override)
            for ver in new.versions.values():
                if ver.model is not None:
                    ver.scheduler = Batcher(ver.model, ver.stats, policy_from_config(ver.model.config), self.metrics)
            old = entry.versions
            entry.versions, entry.reason = new.versions, new.reason
            for ver in new.versions.values():
                self.metrics.model_changed(name, ver.version, ver.state, ver.reason)
            self._retire(old.values())
            return entry

    async def unload(self, name: str) -> None:
        """Stop serving a model; queued and running requests finish first."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self.models.get(name)
            if entry is None:
                raise ModelNotFound(f"unknown model '{name}'")
            old = entry.versions
            entry.versions = {v: VersionEntry(v, UNAVAILABLE, "unloaded", stats=ver.stats) for v, ver in old.items()}
            for v in entry.versions:
                self.metrics.model_changed(name, v, UNAVAILABLE, "unloaded")
            self._retire(old.values())

    def _load_versions(self, source: ModelSource, override: mc.ModelConfig | None) -> ModelEntry:
        """Blocking: read config, pick versions, load each; every failure becomes a reason."""
        result = ModelEntry(source.name)
        try:
            config = override if override is not None else source.read_config()
        except GatewayError as exc:
            result.reason = exc.message
            log.error("model %s: %s", source.name, exc.message)
            return result
        if not source.versions:
            result.reason = "no version directories"
            log.error("model %s: no version directories in %s", source.name, source.path)
            return result
        for version in model_config.select_versions(config, source.versions):
            try:
                model = ModelVersion.load(
                    source.name, version, source.model_file(version, config), config, self.options
                )
            except (GatewayError, OSError, ValueError) as exc:
                reason = getattr(exc, "message", None) or str(exc)
                log.error("model %s version %d failed to load: %s", source.name, version, reason)
                result.versions[version] = VersionEntry(version, UNAVAILABLE, reason)
                continue
            result.versions[version] = VersionEntry(version, READY, "", model, None, VersionStats(source.name, version))
            log.info(
                "model %s version %d ready (max_batch_size %d, providers %s)",
                source.name,
                version,
                model.max_batch_size,
                model.providers,
            )
        if not result.versions:
            result.reason = "no version matches the version policy"
        return result

    def _retire(self, versions) -> None:
        for ver in versions:
            if ver.scheduler is not None:
                task = asyncio.get_running_loop().create_task(self._close(ver.scheduler))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _close(scheduler: Batcher, timeout: float | None = None) -> None:
        await scheduler.drain(timeout)
        await scheduler.close()

    async def close(self, timeout: float) -> None:
        """Drain every version (up to ``timeout`` seconds) and release all sessions."""
        for entry in self.models.values():
            self._retire(entry.versions.values())
            entry.versions = {}
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=timeout)


__all__ = ["READY", "UNAVAILABLE", "IndexRow", "ModelEntry", "ModelLoadError", "ModelManager", "VersionEntry"]
