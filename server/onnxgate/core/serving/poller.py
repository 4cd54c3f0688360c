"""Poll mode: follow the model repository on disk.

Every poll scans the repository and fingerprints each model (size and mtime of every file of
its config and version directories). A model whose fingerprint differs from the last poll's is
*settling* and left alone; once it has stayed the same for one whole poll interval and differs
from what was last loaded, it is (re)loaded through the manager's swap. So a version directory
that is still being copied is never loaded half-written: it is considered once nothing in it
has changed for one poll interval. A model directory that disappears is unloaded; a model an
operator unloaded stays unloaded until an operator loads it again.

The initial load scans the repository before it loads, which can take long; whatever changed
meanwhile (a version copied in, rewritten or removed, a new or vanished model) differs from
what was loaded, so the polls treat it as a change.
"""

from __future__ import annotations

import asyncio
import logging

from onnxgate.core.serving import model_config
from onnxgate.core.serving.manager import READY, ModelEntry, ModelManager, merge_config
from onnxgate.core.serving.source import ModelSource, model_fingerprints
from onnxgate.errors import GatewayError

log = logging.getLogger(__name__)

OPERATOR_UNLOADED = "unloaded"


def _snapshot(sources: dict[str, ModelSource]) -> dict[str, tuple]:
    out = {}
    for name, src in sources.items():
        config, versions = model_fingerprints(src)
        out[name] = (config, tuple(sorted(versions.items())))
    return out


def _matches_loaded(entry: ModelEntry | None, source: ModelSource, snap: tuple) -> bool:
    """Whether the model on disk (``snap``) is what the initial load loaded into ``entry`` (blocking)."""
    if entry is None:
        return False  # appeared after the initial scan
    config_print, version_prints = snap[0], dict(snap[1])
    if any(v not in version_prints for v in entry.versions):
        return False  # a version directory went away
    for v, ver in entry.versions.items():
        if ver.state == READY and ver.fingerprint[:2] != (version_prints[v], config_print):
            return False  # files or config rewritten after they were loaded
    if not entry.versions:
        return True  # a model-level failure: nothing more to compare
    try:
        config = source.read_config()
    except GatewayError:
        return False
    if entry.override is not None:
        config = merge_config(config, entry.override)
    return set(model_config.select_versions(config, source.versions)) <= set(entry.versions)  # none added


def _loaded_snapshot(models: dict[str, ModelEntry], sources: dict[str, ModelSource], snap: dict[str, tuple]) -> dict:
    """The part of ``snap`` that is loaded as it is now; ``()`` for loaded models gone from disk."""
    loaded = {name: s for name, s in snap.items() if _matches_loaded(models.get(name), sources[name], s)}
    loaded.update({name: () for name in models if name not in snap})
    return loaded


class RepositoryPoller:
    """Owns the polling task of poll mode."""

    def __init__(self, manager: ModelManager, interval_s: float) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self._seen: dict[str, tuple] = {}
        self._loaded: dict[str, tuple] = {}
        self._task: asyncio.Task | None = None

    async def prime(self) -> None:
        """Record the repository after the initial load, and what of it that load loaded."""
        sources = await asyncio.to_thread(self.manager.repository.scan)
        snap = await asyncio.to_thread(_snapshot, sources)
        self._seen = dict(snap)
        self._loaded = await asyncio.to_thread(_loaded_snapshot, dict(self.manager.models), sources, snap)
        for name in sorted(set(snap) - set(self._loaded)):
            log.info("model %s changed in the repository while loading; the next polls load it", name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except Exception:  # a bad poll must not end polling
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """One poll: load what settled and changed, unload what disappeared."""
        sources = await asyncio.to_thread(self.manager.repository.scan)
        snap = await asyncio.to_thread(_snapshot, sources)
        for name in sorted(snap):
            settled = self._seen.get(name) == snap[name]
            self._seen[name] = snap[name]
            if not settled or self._loaded.get(name) == snap[name]:
                continue
            entry = self.manager.models.get(name)
            if entry is not None and not entry.versions and entry.reason == OPERATOR_UNLOADED:
                continue
            log.info("model %s changed in the repository; loading", name)
            self._loaded[name] = snap[name]
            try:
                await self.manager.load(name, source=sources[name], keep_override=True)
            except Exception:
                log.exception("model %s: reload failed", name)
        for name in sorted(set(self._loaded) - set(snap)):
            log.info("model %s left the repository; unloading", name)
            del self._loaded[name]
            self._seen.pop(name, None)
            if name in self.manager.models:
                await self.manager.unload(name, "removed from the repository")
                self.manager.forget(name)
