"""Rollout state on disk: one JSON file per route, replaced atomically, so a restart resumes.

A file is written whole to a temporary file in the same directory, flushed to disk, moved over
the old one (``os.replace``) and the directory flushed too: a crash leaves the old state or
the new, never half of one. File names come from the route's name through a hash (with a
readable, sanitised prefix), so any route name is safe and two names never share a file. A file
that cannot be read or parsed is logged and treated as absent: a rollout then starts afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
SUFFIX = ".rollout.json"


class StateStore:
    """The saved state of every route's rollout, in ``directory`` (created on the first save)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, route: str) -> Path:
        """The file of ``route``: ``<sanitised prefix>-<sha256 prefix>.rollout.json``."""
        digest = hashlib.sha256(route.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        return self.directory / f"{_UNSAFE.sub('_', route)[:64]}-{digest}{SUFFIX}"

    def save(self, route: str, state: dict[str, Any]) -> None:
        """Write ``state`` atomically; raises OSError (or TypeError for what JSON cannot hold)."""
        data = orjson.dumps({"route": route, "state": state})
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(route)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._sync_directory()

    def load(self, route: str) -> dict[str, Any] | None:
        """The saved state of ``route``; None when there is none or it cannot be used (logged)."""
        target = self.path(route)
        try:
            doc = orjson.loads(target.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("rollout state of route %r in %s is unreadable (%s); ignoring it", route, target, exc)
            return None
        if not isinstance(doc, dict) or doc.get("route") != route or not isinstance(doc.get("state"), dict):
            log.warning("rollout state file %s is not the state of route %r; ignoring it", target, route)
            return None
        return doc["state"]

    def delete(self, route: str) -> None:
        """Forget ``route``'s state (nothing to forget is fine)."""
        self.path(route).unlink(missing_ok=True)
        self._sync_directory()

    def routes(self) -> list[str]:
        """The routes with a readable saved state."""
        out = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")) if self.directory.is_dir() else ():
            if path.name.startswith(".tmp-"):
                continue
            try:
                doc = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("route"), str) and self.path(doc["route"]) == path:
                out.append(doc["route"])
        return out

    def _sync_directory(self) -> None:
        """Flush the directory entry (the rename) to disk, where the platform allows it."""
        if not self.directory.is_dir():
            return
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # not every file system or platform syncs a directory
            pass
        finally:
            os.close(fd)
