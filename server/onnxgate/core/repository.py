"""The model repository on disk: ``<repo>/<model>/<version>/model.onnx`` plus optional
``<repo>/<model>/config.pbtxt``. Scanning only; loading is the manager's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from onnxgate.core import model_config
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
        if self.config_path.is_file():
            return model_config.read_pbtxt(self.config_path)
        return mc.ModelConfig()

    def model_file(self, version: int, config: mc.ModelConfig) -> Path:
        return self.path / str(version) / (config.default_model_filename or DEFAULT_MODEL_FILENAME)


def _is_version(dirname: str) -> bool:
    """A version directory is named by a positive integer written plainly ("3", not "03", "+3" or "³")."""
    return dirname.isascii() and dirname.isdigit() and dirname[0] != "0"


class Repository:
    """A local directory of models."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def scan(self) -> dict[str, ModelSource]:
        """Every model directory with its integer version folders (blocking)."""
        found: dict[str, ModelSource] = {}
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            try:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
            except OSError:  # cannot even stat it: reported as that model's failure
                pass
            found[entry.name] = self._source(entry)
        return found

    def find(self, name: str) -> ModelSource | None:
        """One model directory, or None when absent (blocking)."""
        if not name or "/" in name or "\0" in name or name.startswith(".") or len(name.encode()) > 255:
            return None  # no directory can have that name (255 bytes is the file-name limit)
        path = self.root / name
        try:
            if not path.is_dir():
                return None
        except OSError:  # e.g. a name the file system refuses
            return None
        return self._source(path)

    @staticmethod
    def _source(path: Path) -> ModelSource:
        """The model directory's versions; one that cannot be read is a source with an ``error``
        (that model is unavailable, the others load)."""
        try:
            versions = tuple(sorted(int(v.name) for v in path.iterdir() if v.is_dir() and _is_version(v.name)))
        except OSError as exc:
            return ModelSource(path.name, path, (), error=f"cannot read model directory: {exc.strerror or exc}")
        return ModelSource(path.name, path, versions)


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
