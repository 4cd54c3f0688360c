"""The local mirror of a remote registry (an object store, MLflow): the cache directory, the manifest
written with each cached directory, and :class:`RemoteError`.

**The cache only ever deletes or moves what it made.** Every model directory it makes holds a marker
file (:data:`MARKER`); every version directory it installs holds its manifest (:data:`MANIFEST`). It
writes into, prunes and sweeps only real directories (never through a symlink) directly under its
root, named by a valid model name and version, that carry them. Anything else found there (a link, a
file, a directory someone else put there) is left alone; a model whose directory is such a thing is
refused (``RemoteError``) rather than written through. Model directories of caches made before the
marker existed are adopted when they hold a manifest (they are onnxgate's) or nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxgate.core.urls import redact_text
from onnxgate.errors import Unavailable

log = logging.getLogger(__name__)

MANIFEST = ".onnxgate-remote.json"
MARKER = ".onnxgate-cache"  # in each model directory the cache made


class RemoteError(Unavailable):
    """A remote repository could not be listed or a file could not be fetched or verified: the
    caller sees 503 / UNAVAILABLE (the store may answer on a retry), never a 500."""


def why(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """``exc`` as text, without the user info or query of any URL in it, nor ``secrets``."""
    return f"{type(exc).__name__}: " + redact_text(str(getattr(exc, "message", exc)), secrets)


def is_version(name: str) -> bool:  # as in Repository: a plain positive integer
    return name.isascii() and name.isdigit() and name[0] != "0"


def is_model_name(name: str) -> bool:
    """A name that is one directory entry of the cache: no separator, no leading dot, <= 255 bytes."""
    return (bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")
            and len(name.encode("utf-8", "surrogateescape")) <= 255)


def read_manifest(directory: Path) -> dict[str, Any]:
    """``{rel path: {"remote": ..., "local": [size, mtime_ns]}}`` as written with ``directory``, or {}."""
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_manifest(directory: Path, remote: Mapping[str, Any]) -> None:
    """Record each file's ``remote`` identity and its local size and mtime as written now."""
    stats = {rel: (directory / rel).stat() for rel in remote}
    entries = {rel: {"remote": r, "local": [stats[rel].st_size, stats[rel].st_mtime_ns]} for rel, r in remote.items()}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, sort_keys=True), encoding="utf-8")


def is_current(directory: Path, manifest: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
    """The cached files are exactly ``remote``'s, each intact since it was written."""
    return set(manifest) == set(remote) and all(
        manifest[rel].get("remote") == r and intact(directory / rel, manifest[rel]) for rel, r in remote.items())


def intact(path: Path, entry: Mapping[str, Any]) -> bool:
    with contextlib.suppress(OSError):
        return [(st := path.stat()).st_size, st.st_mtime_ns] == entry.get("local")
    return False


def is_safe_rel(rel: str) -> bool:
    """A manifest's relative path that stays below its directory (a manifest is a file: never trusted)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\0" not in rel and all(p not in ("", ".", "..") for p in parts)


def _real_dir(path: Path) -> bool:
    """A directory itself, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove(path: Path) -> None:
    """Delete ``path``: a directory tree (rmtree never follows the links inside it), or a link or file."""
    if _real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


class CacheDir:
    """The cache root of one process: a private temporary directory (removed at close or exit), or a
    given directory held with an exclusive lock (another process using it gets a private subdirectory).
    Keeps the clock of cached versions waiting ``retain_s`` to be removed."""

    def __init__(self, path: str | Path | None, retain_s: float) -> None:
        self.retain_s = retain_s
        self._unwanted: dict[tuple[str, int], float] = {}
        self._lock_file, owned = None, True
        if path:
            root = Path(path).expanduser().absolute()
            root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(root / ".lock", "w")  # noqa: SIM115 - held for the process's life
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.path, owned = root, False
            except OSError:
                self.path = Path(tempfile.mkdtemp(prefix=".process-", dir=root))
                log.warning("cache %s is in use by another process; using %s", root, self.path)
        else:
            self.path = Path(tempfile.mkdtemp(prefix="onnxgate-cache-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True) if owned else None
        for entry in self.path.iterdir():
            model_dir = self.model_dir(entry.name) if is_model_name(entry.name) else None
            for stale in model_dir.glob(".tmp-*") if model_dir is not None else ():
                _remove(stale)

    def model_dir(self, model: str, create: bool = False) -> Path | None:
        """``<cache>/<model>`` when it is the cache's own (a real directory with :data:`MARKER`), else
        None; with ``create``, made (or adopted) when absent, and a ``RemoteError`` when the name or
        what is there cannot be used."""
        if not is_model_name(model):
            if create:
                raise RemoteError(f"{model[:64]!r} cannot be a model's directory in the cache")
            return None
        path = self.path / model
        if create and not os.path.lexists(path):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                (path / MARKER).touch()
        if _real_dir(path) and (_real_file(path / MARKER) or (create and self._adopt(path))):
            return path
        if create:
            raise RemoteError(f"cache: {path} was not made by this cache (a link, a file or a foreign directory); "
                              "remove it or use another cache_dir")
        return None

    @staticmethod
    def _adopt(path: Path) -> bool:
        """A model directory of an older cache (no marker): ours if it holds a manifest, or nothing."""
        entries = list(path.iterdir())
        ours = not entries or _real_file(path / MANIFEST) or any(
            is_version(e.name) and _real_file(e / MANIFEST) for e in entries)
        if ours:
            (path / MARKER).touch()
        return ours

    def staging(self, model: str) -> Path:
        """A new empty directory beside the model's versions (same filesystem: renames are atomic)."""
        model_dir = self.model_dir(model, create=True)
        assert model_dir is not None
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))

    def install(self, staged: Path, final: Path) -> None:
        """Put ``staged`` (from :meth:`staging`) in place of the version directory ``final`` by renames."""
        model_dir = self.model_dir(final.parent.name)
        if (model_dir is None or final.parent != model_dir or staged.parent != model_dir
                or not staged.name.startswith(".tmp-") or not is_version(final.name) or not _real_dir(staged)):
            raise RemoteError(f"cache: will not install {staged.name} as {final}")
        old = final.with_name(f".tmp-old-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, old)
        os.rename(staged, final)
        _remove(old)

    def cached_versions(self, model: str) -> set[int]:
        """The versions the cache installed for ``model``: real directories holding a manifest."""
        model_dir = self.model_dir(model)
        if model_dir is None:
            return set()
        return {int(d.name) for d in model_dir.iterdir()
                if is_version(d.name) and _real_dir(d) and _real_file(d / MANIFEST)}

    def prune(self, model: str, keep: set[int], gone: bool = False) -> None:
        """Delete cached versions not in ``keep`` once unwanted for ``retain_s`` (and a ``gone`` model's dir).
        Only what the cache made is deleted (see the module docstring)."""
        now, model_dir, cached = time.monotonic(), self.model_dir(model), self.cached_versions(model)
        for key in [k for k in self._unwanted if k[0] == model and (k[1] in keep or k[1] not in cached)]:
            del self._unwanted[key]
        if model_dir is None:
            return
        for v in sorted(cached - keep):
            if now - self._unwanted.setdefault((model, v), now) >= self.retain_s:
                shutil.rmtree(model_dir / str(v), ignore_errors=True)
                del self._unwanted[(model, v)]
                cached.discard(v)
                log.info("model %s version %d removed from the cache", model, v)
        if gone and not cached:
            shutil.rmtree(model_dir, ignore_errors=True)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs once only
        if self._lock_file is not None:
            self._lock_file.close()
