"""Poll mode: follow the model repository on disk.

Every poll scans the repository and fingerprints each model (size and mtime of every file of
its config and version directories). A model whose fingerprint differs from the last poll's is
*settling* and left alone; once it has stayed the same for one whole poll interval and differs
from what was last loaded, it is (re)loaded through the manager's swap. So a version directory
that is still being copied is never loaded half-written: it is considered once nothing in it
has changed for one poll interval. A model directory that disappears is unloaded; a model an
operator unloaded stays unloaded until an operator loads it again.
"""

from __future__ import annotations

import asyncio
import logging

from onnxgate.core.manager import ModelManager
from onnxgate.core.repository import ModelSource, model_fingerprints

log = logging.getLogger(__name__)

OPERATOR_UNLOADED = "unloaded"


def _snapshot(sources: dict[str, ModelSource]) -> dict[str, tuple]:
    out = {}
    for name, src in sources.items():
        config, versions = model_fingerprints(src)
        out[name] = (config, tuple(sorted(versions.items())))
    return out


class RepositoryPoller:
    """Owns the polling task of poll mode."""

    def __init__(self, manager: ModelManager, interval_s: float) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self._seen: dict[str, tuple] = {}
        self._loaded: dict[str, tuple] = {}
        self._task: asyncio.Task | None = None

    async def prime(self) -> None:
        """Record the repository as the initial load found it."""
        sources = await asyncio.to_thread(self.manager.repository.scan)
        snap = await asyncio.to_thread(_snapshot, sources)
        self._seen = dict(snap)
        self._loaded = dict(snap)

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
