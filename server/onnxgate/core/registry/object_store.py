"""Model repositories in object stores (s3://, gs://, az://, memory://, file://: any fsspec URL), mirrored
into a local cache: ``scan``/``find`` as in ``Repository``, each ``ModelSource.path`` is ``<cache>/<model>``.

**Fetching.** A scan lists the store once (names, sizes, ETags or mtimes), syncs the model-level files
(config.pbtxt, labels, warm-up data) and caches the versions config.pbtxt's ``version_policy`` selects;
other complete versions are listed too, fetched when the manager opens them (a pin, a rollback) and then
kept while in the store. A version is fetched into ``<cache>/<model>/.tmp-*``, each file checked against
the listing (size; MD5 where the store has one: S3 ETag without ``-``, GCS ``md5Hash``, Azure
``content_md5``), then renamed into place; files whose size and ETag did not change are hard-linked from
the cached copy. Each scan checks the cache against the manifest written with it (size and mtime of
each file, ``.onnxgate-remote.json``): a damaged or missing file is fetched again.

**Incomplete uploads are never used.** S3 shows an object only once fully written, but a version of
several objects (model.onnx plus external data) can be half uploaded. A version is complete when (1)
its model file (``default_model_filename``, else model.onnx) is listed, (2) with ``marker`` set, the
marker object (e.g. ``READY``, uploaded last) is listed, (3) its listing stayed the same for ``settle_s``:
a scan that sees a new or changed version lists again ``settle_s`` later and uses it only if nothing
changed. An incomplete version is skipped (a copy cached earlier stays in use). The marker is the strict
rule; settling alone trusts uploaders to write a version's objects less than ``settle_s`` apart.

**Cleanup.** A cached version that left the store or is no longer wanted is deleted ``retain_s`` after a
scan first saw it so, when the swap is long done (sessions hold their weights in memory anyway).

**Credentials** come from each store's standard environment and config (``AWS_*`` incl.
``AWS_ENDPOINT_URL``, ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``) or
``storage_options``; none is logged, nor a URL's user info or query.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxgate.core.registry.mirror import (
    CacheDir,
    RemoteError,
    intact,
    is_current,
    is_safe_rel,
    is_version,
    read_manifest,
    why,
    write_manifest,
)
from onnxgate.core.serving import model_config
from onnxgate.core.serving.source import DEFAULT_MODEL_FILENAME, ModelSource
from onnxgate.core.urls import redact_url, url_secrets
from onnxgate.errors import GatewayError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One object as listed: store path, size, change tag (ETag, checksum or mtime), MD5 when known."""

    key: str
    size: int
    tag: str
    md5: str = ""


def _remote_file(key: str, info: Mapping[str, Any]) -> RemoteFile:
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    md5 = etag.lower() if re.fullmatch(r"[0-9a-f]{32}", etag.lower()) else ""  # S3, unless multipart or SSE-KMS
    if not md5 and info.get("md5Hash"):  # GCS, base64
        with contextlib.suppress(ValueError):
            md5 = base64.b64decode(str(info["md5Hash"])).hex()
    azure_md5 = (info.get("content_settings") or {}).get("content_md5") if not md5 else None
    md5 = bytes(azure_md5).hex() if isinstance(azure_md5, bytes | bytearray) else md5
    mtime = next((info[k] for k in ("LastModified", "mtime", "updated", "last_modified", "created") if k in info), "")
    return RemoteFile(key, int(info.get("size") or 0), etag or md5 or str(info.get("crc32c") or mtime), md5)


Listing = dict[str, dict[int, dict[str, RemoteFile]]]  # model -> version (0: model level) -> rel path -> file


@dataclass(frozen=True, slots=True)
class LazyModelSource(ModelSource):
    """A ModelSource whose versions are fetched (if not cached yet) when the manager opens their model file."""

    fetch: Callable[[str, int], None] = field(compare=False, repr=False)

    def model_file(self, version: int, config: mc.ModelConfig) -> Path:
        self.fetch(self.name, version)
        return ModelSource.model_file(self, version, config)


class RemoteRepository:
    """A model repository in an object store, mirrored into ``cache_dir`` (see the module docstring)."""

    def __init__(
        self, url: str, cache_dir: str | Path | None = None, storage_options: Mapping[str, Any] | None = None, *,
        settle_s: float = 2.0, retain_s: float = 60.0, marker: str = "", verify_checksums: bool = True,
    ) -> None:
        self.url, self._secrets = redact_url(url), url_secrets(url)  # the secrets: to cut out of messages
        try:
            import fsspec
            self._fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise RemoteError(f"cannot open {self.url}: {why(exc, self._secrets)}") from None
        self._root = root.rstrip("/")
        self.cache = CacheDir(cache_dir, retain_s)
        self.settle_s, self.marker, self.verify_checksums = settle_s, marker, verify_checksums
        self._lock = threading.RLock()
        self._seen: dict[tuple[str, int], tuple[tuple, float]] = {}  # listing signature, since when
        self._complete: dict[tuple[str, int], dict[str, RemoteFile]] = {}
        self._selected: dict[str, set[int]] = {}
        self._pinned: set[tuple[str, int]] = set()  # opened by the manager though not selected: kept
        self._waiting: set[tuple[str, int]] = set()  # incomplete versions already logged
        log.info("model repository %s (object store; cache %s)", self.url, self.cache.path)

    def scan(self) -> dict[str, ModelSource]:
        """Every model in the store, its wanted versions cached (blocking)."""
        with self._lock:
            listing, unsettled = self._settled_listing(None)
            sources: dict[str, ModelSource] = {n: self._sync(n, listing[n], unsettled) for n in sorted(listing)}
            for name in {d.name for d in self.cache.path.iterdir()} - set(listing):  # prune keeps to its own
                self.cache.prune(name, set(), gone=True)
            return sources

    def find(self, name: str) -> ModelSource | None:
        """One model, or None when the store has none of that name (blocking)."""
        if not name or "/" in name or name.startswith("."):
            return None
        with self._lock:
            listing, unsettled = self._settled_listing(name)
            return self._sync(name, listing[name], unsettled) if name in listing else None

    def close(self) -> None:
        self.cache.close()  # removes a private cache directory

    def _list(self, model: str | None) -> Listing:
        self._fs.invalidate_cache()
        try:
            entries = self._fs.find(f"{self._root}/{model}" if model else self._root, detail=True)
        except FileNotFoundError as exc:  # S3: no such bucket (a missing prefix lists empty)
            raise RemoteError(f"{self.url} does not exist: {why(exc, self._secrets)}") from None
        except Exception as exc:
            raise RemoteError(f"cannot list {self.url}: {why(exc, self._secrets)}") from None
        out: Listing = {}
        for key, info in entries.items():
            parts = key[len(self._root) + 1 :].split("/") if key.startswith(self._root + "/") else []
            if info.get("type", "file") != "file" or len(parts) < 2 or any(not p or p[0] == "." for p in parts):
                continue
            if (model and parts[0] != model) or (len(parts) == 2 and is_version(parts[1])):
                continue
            version, rel = (int(parts[1]), parts[2:]) if is_version(parts[1]) else (0, parts[1:])
            out.setdefault(parts[0], {}).setdefault(version, {})["/".join(rel)] = _remote_file(key, info)
        return out

    def _unsettled(self, listing: Listing, model: str | None) -> tuple[set[tuple[str, int]], float]:
        """Versions whose listing changed less than ``settle_s`` ago, and how long until all would settle."""
        now, wait, unsettled = time.monotonic(), 0.0, set()
        keys = {(m, v) for m, versions in listing.items() for v in versions}
        self._seen = {k: seen for k, seen in self._seen.items() if k in keys or (model and k[0] != model)}
        for m, v in keys:
            signature = tuple(sorted((rel, f.size, f.tag) for rel, f in listing[m][v].items()))
            seen = self._seen.get((m, v))
            if seen is None or seen[0] != signature:
                seen = self._seen[(m, v)] = (signature, now)
            if now - seen[1] < self.settle_s:
                unsettled.add((m, v))
                wait = max(wait, self.settle_s - (now - seen[1]))
        return unsettled, wait

    def _settled_listing(self, model: str | None) -> tuple[Listing, set[tuple[str, int]]]:
        """List; if something is new or changed, list again once it could have settled."""
        listing = self._list(model)
        unsettled, wait = self._unsettled(listing, model)
        if unsettled:
            time.sleep(wait + 0.01)
            listing = self._list(model)
            unsettled = self._unsettled(listing, model)[0]
        return listing, unsettled

    def _sync(self, name: str, versions: dict[int, dict[str, RemoteFile]], unsettled: set) -> LazyModelSource:
        model_dir = self.cache.path / name
        fetch = functools.partial(self._fetch, opened=True)
        try:
            self.cache.model_dir(name, create=True)
        except RemoteError as exc:  # a name or an entry the cache will not use: that model fails, the others load
            log.error("model %s: %s", name, exc.message)
            return LazyModelSource(name, model_dir, (), error=exc.message, fetch=fetch)
        if (name, 0) not in unsettled:
            try:
                self._mirror(name, model_dir, versions.get(0, {}), staged=False)
            except (OSError, RemoteError) as exc:
                log.error("model %s: model files not updated: %s", name, why(exc, self._secrets))
        try:
            config = ModelSource(name, model_dir, ()).read_config()
        except GatewayError:
            config = mc.ModelConfig()  # the manager reports the bad config when it loads
        filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
        usable = []
        self._complete = {k: files for k, files in self._complete.items() if k[0] != name or k[1] in versions}
        self._waiting -= {k for k in self._waiting if k[0] == name and k[1] not in versions}
        for v, files in sorted(versions.items()):
            missing = [f for f in (filename, self.marker) if f and f not in files]
            if v and not missing and (name, v) not in unsettled:
                usable.append(v)
                self._complete[(name, v)] = files
                self._waiting.discard((name, v))
            elif v:
                self._complete.pop((name, v), None)
                if (name, v) not in self._waiting:
                    self._waiting.add((name, v))
                    log.info("model %s version %d: upload incomplete (%s); not used until complete", name, v,
                             f"missing {', '.join(missing)}" if missing else "still changing")
                if read_manifest(model_dir / str(v)):
                    usable.append(v)  # the copy cached earlier stays usable
        wanted = set(model_config.select_versions(config, usable)) if usable else set()
        self._selected[name] = wanted
        self._pinned -= {(name, v) for v in versions if v not in usable}
        keep = wanted | {v for v in usable if (name, v) in self._pinned}
        for v in sorted(keep):
            try:
                self._fetch(name, v)
            except (OSError, RemoteError) as exc:
                log.error("model %s version %d: %s", name, v, why(exc, self._secrets))
        self.cache.prune(name, keep)
        return LazyModelSource(name, model_dir, tuple(usable), fetch=fetch)

    def _fetch(self, name: str, version: int, opened: bool = False) -> None:
        """Cache a complete version unless the cached copy is intact and current. A version ``opened`` by the
        manager though the policy left it out (a pin) stays cached."""
        with self._lock:
            files = self._complete.get((name, version))
            if files is None:
                return  # not complete now: the cached copy (if any) is what there is
            if opened and version not in self._selected.get(name, set()):
                self._pinned.add((name, version))
            payload = {rel: f for rel, f in files.items() if rel != self.marker}
            if self._mirror(name, self.cache.path / name / str(version), payload, staged=True):
                log.info("model %s version %d cached from %s", name, version, self.url)

    def _mirror(self, name: str, final: Path, files: dict[str, RemoteFile], staged: bool) -> bool:
        """Make ``final`` hold ``files``: a version directory is built aside (unchanged files hard-linked)
        and renamed into place; model-level files are replaced one by one. False if nothing changed."""
        remote, old = {rel: [f.size, f.tag] for rel, f in files.items()}, read_manifest(final)
        if is_current(final, old, remote):
            return False
        target = self.cache.staging(name) if staged else final
        try:
            for rel in set(old) - set(files) if not staged else ():
                if is_safe_rel(rel):  # a manifest is a file in the cache: never followed out of it
                    (final / rel).unlink(missing_ok=True)
            for rel, f in sorted(files.items()):
                same = rel in old and old[rel].get("remote") == [f.size, f.tag] and intact(final / rel, old[rel])
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                if same and staged:
                    os.link(final / rel, target / rel)
                elif not same:
                    self._download(f, target / rel)
            write_manifest(target, remote)
            if staged:
                self.cache.install(target, final)
        finally:
            if staged:
                shutil.rmtree(target, ignore_errors=True)
        return True

    def _download(self, f: RemoteFile, dst: Path) -> None:
        """Stream one object to a temporary file, check size and (where given) MD5, rename it to ``dst``."""
        digest, size, name = hashlib.md5(usedforsecurity=False), 0, f"{self.url}{f.key[len(self._root):]}"
        tmp = dst.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            with self._fs.open(f.key, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if size != f.size:
                raise RemoteError(f"{name}: fetched {size} bytes, the listing says {f.size}")
            if self.verify_checksums and f.md5 and digest.hexdigest() != f.md5:
                raise RemoteError(f"{name}: MD5 {digest.hexdigest()} does not match the store's {f.md5}")
            os.replace(tmp, dst)
        except (OSError, ValueError) as exc:
            raise RemoteError(f"cannot fetch {name}: {why(exc, self._secrets)}") from None
        finally:
            tmp.unlink(missing_ok=True)
