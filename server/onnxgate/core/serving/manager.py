"""Model lifecycle: load the repository, keep each version's state, find what serves a call.

**The swap.** ``load`` computes the versions the policy wants, keeps those already serving
from unchanged files, and loads (in a worker thread, never on the loop), warms up and checks
the rest while the old versions keep serving. Then one assignment makes the new set current:
new requests go to it; requests already queued or running on a replaced version finish there,
after which its sessions are released. A version that fails to load never takes traffic: when
a wanted version fails, every version that was serving stays (the failure shows in the index,
the log and ``onnxgate_model_load_failures_total``).

**Pinning.** An override config (the load API's ``config``) is merged over config.pbtxt field
by field and stays in force (also across polls) until a load without one. ``pin(name, v)`` is
an override of ``version_policy { specific { versions: [v] } }``; ``rollback(name)`` pins the
version that served before the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from onnxgate.core.inference import parse_version
from onnxgate.core.metrics import Metrics
from onnxgate.core.serving import model_config, model_files
from onnxgate.core.serving.batch_policy import policy_from_config
from onnxgate.core.serving.batcher import Batcher
from onnxgate.core.serving.model import LoadOptions, ModelVersion
from onnxgate.core.serving.source import Fingerprint, ModelSource, ModelStore, fingerprint
from onnxgate.core.serving.stats import VersionStats
from onnxgate.core.tracing import Tracing
from onnxgate.errors import GatewayError, InvalidInput, ModelNotFound, Unavailable
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class VersionEntry:
    """One version of a model: its state and, when ready, what runs it."""

    version: int
    state: str
    reason: str = ""
    model: ModelVersion | None = None
    scheduler: Batcher | None = None
    stats: VersionStats | None = None
    fingerprint: Fingerprint = ()  # of the version directory and config it was loaded from


@dataclass(slots=True)
class ModelEntry:
    """A model and its versions, as last (re)loaded."""

    name: str
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    reason: str = ""  # model-level failure (bad config, no versions, unloaded)
    override: mc.ModelConfig | None = None  # operator's config override (pin), kept until cleared
    history: list[int] = field(default_factory=list)  # versions that served, oldest first
    last_failures: dict[int, str] = field(default_factory=dict)  # of the latest load; 0 = model-level
    available: tuple[int, ...] = ()  # the versions in the repository at the latest load (a pin may name any)
    _ready: list[VersionEntry] = field(default_factory=list, repr=False)
    _ready_of: dict | None = field(default=None, repr=False)

    def ready_versions(self) -> list[VersionEntry]:
        """Ready versions, highest first; cached until ``versions`` is replaced (never edited)."""
        if self._ready_of is not self.versions:
            self._ready = sorted(
                (v for v in self.versions.values() if v.state == READY), key=lambda v: v.version, reverse=True
            )
            self._ready_of = self.versions
        return self._ready


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One row of the repository index."""

    name: str
    version: str
    state: str
    reason: str


def merge_config(base: mc.ModelConfig, override: mc.ModelConfig) -> mc.ModelConfig:
    """``base`` with every top-level field that ``override`` sets replaced by the override's."""
    out = mc.ModelConfig()
    out.CopyFrom(base)
    for fd, value in override.ListFields():
        out.ClearField(fd.name)
        target = getattr(out, fd.name)
        if fd.is_repeated:  # protobuf >= 6 (7 dropped ``label``)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                target.MergeFrom(value)
            else:
                target.extend(value)
        elif fd.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def pin_config(version: int) -> mc.ModelConfig:
    """An override that serves exactly ``version``."""
    config = mc.ModelConfig()
    config.version_policy.specific.versions.append(version)
    return config


class ModelManager:
    """Owns every model entry; the only writer of their states."""

    def __init__(self, repository: ModelStore, options: LoadOptions, metrics: Metrics | None = None) -> None:
        self.repository = repository
        self.options = options
        self.metrics = metrics or Metrics()
        self.tracing: Tracing | None = None  # batch spans, when tracing is on
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()
        self._last_failures: dict[str, dict[int, str]] = {}
        self.shadowed_by: Callable[[str], str | None] = lambda name: None  # a route hiding this name

    # -- lookups (event loop, no blocking) -------------------------------------------------
    def get(self, name: str, version: str = "") -> VersionEntry:
        """The ready version serving ``name`` (the highest when ``version`` is empty)."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound.unknown(name)
        if version:
            number = parse_version(version)
            if number is None:
                raise ModelNotFound.unknown(name, repr(version), "versions are integers")
            ver = entry.versions.get(number)
            if ver is None:
                raise ModelNotFound.unknown(name, version)
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
                reason = ver.reason or (f"serving; the latest load failed: {entry.reason}" if entry.reason else "")
                rows.append(IndexRow(name, str(v), ver.state, reason))
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
    async def load_all(self, names: Iterable[str] | None = None) -> None:
        """Load every model of the repository (or only ``names``); failures are recorded."""
        sources = await asyncio.to_thread(self.repository.scan)
        wanted = set(sources) if names is None else set(names) & set(sources)
        for name in set(sources) - wanted:
            entry = self.models.setdefault(name, ModelEntry(name, reason="not loaded"))
            entry.available = tuple(sorted(sources[name].versions))  # what a load or a pin may name
        await asyncio.gather(*(self.load(name, source=sources[name], keep_override=True) for name in sorted(wanted)))

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(
        self,
        name: str,
        override: mc.ModelConfig | None = None,
        source: ModelSource | None = None,
        keep_override: bool = False,
    ) -> ModelEntry:
        """(Re)load a model; the versions serving now keep serving until the new set is ready.

        ``override`` is merged over config.pbtxt and remembered; without one, a remembered
        override is dropped unless ``keep_override`` (polls keep it, operators' loads do not).
        """
        if name not in self.models and source is None:  # no lock (a dict entry) for names clients make up
            source = await asyncio.to_thread(self.repository.find, name)
            if source is None:
                raise ModelNotFound(f"model '{name}' is not in the repository")
        async with self.lock(name):
            if source is None:
                source = await asyncio.to_thread(self.repository.find, name)
            if source is None:
                raise ModelNotFound(f"model '{name}' is not in the repository")
            if (hider := self.shadowed_by(name)) is not None:
                log.warning("model %s is hidden by route %s: requests for '%s' go to the route", name, hider, name)
            entry = self.models.setdefault(name, ModelEntry(name))
            entry.available = tuple(sorted(source.versions))
            # The override is remembered only once the load took effect: a load cancelled while
            # it runs (a client gone, a deadline) or refused changes nothing, not even that.
            planned = override if override is not None else (entry.override if keep_override else None)
            current = {v: ver for v, ver in entry.versions.items() if ver.state == READY}
            new = await asyncio.to_thread(self._plan_and_load, source, planned, current)
            for ver in new.values():
                if ver.model is not None and ver.scheduler is None:
                    policy = policy_from_config(
                        ver.model.config, max_queue_bytes=self.options.max_queue_bytes, scheduler=self.options.scheduler
                    )
                    ver.scheduler = Batcher(ver.model, ver.stats, policy, self.metrics, self.tracing)
            self._swap(entry, new)
            if not entry.last_failures:
                entry.override = planned
            return entry

    def _plan_and_load(
        self, source: ModelSource, override: mc.ModelConfig | None, current: dict[int, VersionEntry]
    ) -> dict[int, VersionEntry]:
        """Blocking: the version set to serve next. Unchanged serving versions are reused. Any
        failure (a bad file, config or value, no memory, no permission) fails this model only."""
        try:
            return self._plan_and_load_versions(source, override, current)
        except Exception as exc:
            reason = _reason(exc)
            log.error("model %s failed to load: %s", source.name, reason)
            return self._failed(source.name, current, {0: reason})

    def _plan_and_load_versions(
        self, source: ModelSource, override: mc.ModelConfig | None, current: dict[int, VersionEntry]
    ) -> dict[int, VersionEntry]:
        name = source.name
        if source.error:
            log.error("model %s: %s", name, source.error)
            return self._failed(name, current, {0: source.error})
        try:
            config = source.read_config()
            if override is not None:
                config = merge_config(config, override)
            model_config.check_limits(config)  # files and sizes a config may ask for, before any session
        except GatewayError as exc:
            log.error("model %s: %s", name, exc.message)
            return self._failed(name, current, {0: exc.message})
        if not source.versions:
            log.error("model %s: no version directories in %s", name, source.path)
            return self._failed(name, current, {0: "no version directories"})
        wanted = model_config.select_versions(config, source.versions)
        if not wanted:
            return self._failed(name, current, {0: "no version matches the version policy"})
        try:  # every file the config names stays in the model's directory: one refusal for the model
            model_files.check_paths(config, source.path, wanted)
        except GatewayError as exc:
            log.error("model %s: %s", name, exc.message)
            return self._failed(name, current, {0: exc.message})
        config_print = fingerprint(source.config_path) if source.config_path.exists() else ()
        override_print = override.SerializeToString(deterministic=True) if override is not None else b""
        new: dict[int, VersionEntry] = {}
        failures: dict[int, str] = {}
        for version in wanted:
            prints = (fingerprint(source.path / str(version)), config_print, override_print)
            old = current.get(version)
            if old is not None and old.fingerprint == prints:
                old.reason = ""
                new[version] = old
                continue
            try:
                model = ModelVersion.load(name, version, source.model_file(version, config), config, self.options,
                                          model_dir=source.path)
            except Exception as exc:  # MemoryError, TypeError from ORT options, PermissionError, ...
                reason = _reason(exc)
                log.error("model %s version %d failed to load: %s", name, version, reason)
                failures[version] = reason
                continue
            stats = old.stats if old is not None and old.stats is not None else VersionStats(name, version)
            # A remote repository may have fetched the files just now: fingerprint what was loaded.
            prints = (fingerprint(source.path / str(version)), config_print, override_print)
            new[version] = VersionEntry(version, READY, "", model, None, stats, prints)
            log.info(
                "model %s version %d ready (max_batch_size %d, providers %s)",
                name,
                version,
                model.max_batch_size,
                model.providers,
            )
        if failures:
            # A wanted version failed: it never takes traffic, and what served keeps serving.
            for v, ver in current.items():
                new.setdefault(v, ver)
            for v, reason in failures.items():
                self.metrics.load_failures.labels(name).inc()
                if v not in new:
                    new[v] = VersionEntry(v, UNAVAILABLE, reason)
                else:  # an older copy of this version keeps serving
                    new[v].reason = f"serving the previous files; new files failed to load: {reason}"
                    log.warning("model %s version %d keeps serving its previous files: %s", name, v, reason)
        self._last_failures[name] = failures
        return new

    def _failed(self, name: str, current: dict[int, VersionEntry], reasons: dict[int, str]) -> dict[int, VersionEntry]:
        self.metrics.load_failures.labels(name).inc()
        self._last_failures[name] = dict(reasons)
        if current:
            log.warning("model %s: keeping versions %s serving", name, sorted(current))
            return dict(current)
        return {v: VersionEntry(v, UNAVAILABLE, r) for v, r in reasons.items()}

    def _swap(self, entry: ModelEntry, new: dict[int, VersionEntry]) -> None:
        """Make ``new`` current in one step; retire what it replaced."""
        old = entry.versions
        new.pop(0, None)  # the placeholder of a model-level failure
        entry.versions = new
        entry.last_failures = self._last_failures.pop(entry.name, {})
        entry.reason = entry.last_failures.get(0, "")
        ready = entry.ready_versions()
        if ready and (not entry.history or entry.history[-1] != ready[0].version):
            entry.history.append(ready[0].version)
            del entry.history[:-16]
        for v, ver in new.items():
            self.metrics.model_changed(entry.name, v, ver.state)
        for v in set(old) - set(new):
            self.metrics.model_state.labels(entry.name, str(v)).set(0)
        keep = {id(ver) for ver in new.values()}
        self._retire(ver for ver in old.values() if id(ver) not in keep)

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        """Stop serving a model; queued and running requests finish first."""
        if name not in self.models:  # no lock (a dict entry) for names clients make up
            raise ModelNotFound.unknown(name)
        async with self.lock(name):
            entry = self.models.get(name)
            if entry is None:
                raise ModelNotFound.unknown(name)
            old = entry.versions
            entry.versions = {}
            entry.reason = reason
            for v in old:
                self.metrics.model_state.labels(name, str(v)).set(0)
            self._retire(old.values())

    def forget(self, name: str) -> None:
        """Drop an unloaded model from the index (its directory is gone)."""
        entry = self.models.get(name)
        if entry is not None and not entry.versions:
            del self.models[name]

    async def pin(self, name: str, version: int) -> ModelEntry:
        """Serve exactly ``version`` until unpinned (a load without override)."""
        return await self.load(name, pin_config(version))

    async def rollback(self, name: str) -> ModelEntry:
        """Pin the version that served before the current one."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound.unknown(name)
        ready = entry.ready_versions()
        current = ready[0].version if ready else None
        previous = [v for v in entry.history if v != current]
        if not previous:
            raise InvalidInput(f"model '{name}' has no previous version to roll back to")
        return await self.pin(name, previous[-1])

    def _retire(self, versions: Iterable[VersionEntry]) -> None:
        for ver in versions:
            if ver.scheduler is not None:
                task = asyncio.get_running_loop().create_task(self._close(ver))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _close(ver: VersionEntry) -> None:
        """Run what the version accepted, then release it; cancelled, it answers the rest
        (queued, being batched or running) with UNAVAILABLE before releasing."""
        scheduler = ver.scheduler
        assert scheduler is not None
        try:
            await scheduler.drain()
        finally:  # shielded: a second cancel (a drain step overrunning) must not stop it halfway
            await asyncio.shield(scheduler.close())
            ver.scheduler = None
            ver.model = None
        await asyncio.to_thread(_release_memory)

    async def close(self, timeout: float) -> None:
        """Drain every version for up to ``timeout`` seconds, then answer what is left with
        UNAVAILABLE and release all sessions. Returns only when every version is closed."""
        for entry in self.models.values():
            self._retire(entry.versions.values())
            entry.versions = {}
        if not self._retiring:
            return
        _, late = await asyncio.wait(list(self._retiring), timeout=max(0.0, timeout))
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)


def _reason(exc: BaseException) -> str:
    """A load failure's reason for the index: the gateway's message, or the error's own words."""
    if isinstance(exc, GatewayError):
        return exc.message
    text = str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _release_memory() -> None:
    """Hand freed heap pages back to the OS after sessions go (glibc keeps them otherwise)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
