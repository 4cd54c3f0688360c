"""What the manager loads from: a model directory on disk, and the store that finds them.

Every registry (a local directory, an object store, MLflow) hands the manager
:class:`ModelSource` directories laid out as ``<model>/<version>/model.onnx`` plus an optional
``<model>/config.pbtxt``: remote registries mirror into a local cache first. Fingerprints (size
and mtime of every file) tell the manager and the poller what changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from onnxgate.core.serving import model_config, model_files
from onnxgate_client.pb import model_config_pb2 as mc

DEFAULT_MODEL_FILENAME = "model.onnx"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model directory as found on disk."""

    name: str
    path: Path
    versions: tuple[int, ...]
    error: str = field(default="", kw_only=True)  # why the directory could not be read ("" = it could)

    @property
    def config_path(self) -> Path:
        return self.path / "config.pbtxt"

    def read_config(self) -> mc.ModelConfig:
        """The model's config.pbtxt, or an empty config when there is none (blocking)."""
        if os.path.lexists(self.config_path):
            return model_config.read_pbtxt(self.config_path)
        return mc.ModelConfig()

    def model_file(self, version: int, config: mc.ModelConfig) -> Path:
        """The version's model file (``default_model_filename``, else model.onnx), resolved: a
        regular file inside the version directory (``model_files.contained_file``), or raises
        ModelLoadError."""
        name = config.default_model_filename or DEFAULT_MODEL_FILENAME
        what = "default_model_filename" if config.default_model_filename else "model file"
        return model_files.contained_file(self.path / str(version), name, what, where=model_files.VERSION_DIR)


class ModelStore(Protocol):
    """A registry as the manager sees it: every model it has, or one by name (both blocking)."""

    def scan(self) -> dict[str, ModelSource]: ...

    def find(self, name: str) -> ModelSource | None: ...


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """(relative path, size, mtime) of every file under ``path`` (or of ``path`` itself): it
    changes whenever a file is written, so equal fingerprints one poll apart mean "settled"."""
    if path.is_file():
        st = path.stat()
        return ((path.name, st.st_size, st.st_mtime_ns),)
    out = []
    for f in sorted(path.rglob("*")):
        try:
            if f.is_file():
                st = f.stat()
                out.append((str(f.relative_to(path)), st.st_size, st.st_mtime_ns))
        except OSError:  # removed while we looked: the next poll sees the new state
            continue
    return tuple(out)


def model_fingerprints(source: ModelSource) -> tuple[Fingerprint, dict[int, Fingerprint]]:
    """The config's fingerprint and each version directory's (blocking)."""
    config = fingerprint(source.config_path) if source.config_path.exists() else ()
    return config, {v: fingerprint(source.path / str(v)) for v in source.versions}
