"""A local model repository: ``<repo>/<model>/<version>/model.onnx`` plus optional
``<repo>/<model>/config.pbtxt``. Scanning only; loading is the manager's job.
"""

from __future__ import annotations

from pathlib import Path

from onnxgate.core.serving.source import ModelSource


def _is_version(dirname: str) -> bool:
    """A version directory is named by a positive integer written plainly ("3", not "03", "+3" or "³")."""
    return dirname.isascii() and dirname.isdigit() and dirname[0] != "0"


class Repository:
    """A local directory of models (a :class:`~onnxgate.core.serving.source.ModelStore`)."""

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
