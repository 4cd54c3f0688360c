"""The MLflow Model Registry as a model repository (``--model-repository mlflow://``).

Importing this module never imports MLflow: only :class:`MlflowRepository` does, when it is built.
The tracking server is ``registry.mlflow.tracking_uri`` or else ``MLFLOW_TRACKING_URI`` (credentials
from MLflow's own ``MLFLOW_TRACKING_TOKEN``/``_USERNAME``/``_PASSWORD``; never logged)::

    registry:
      mlflow:
        models:
          - {name: fraud, alias: champion}                        # the version the alias points to
          - {name: fraud, alias: challenger, serve_as: fraud_challenger}
          - {name: churn, versions: [3, 4]}                       # fixed versions
          - {name: iris, alias: prod, config: "max_batch_size: 8"}  # config.pbtxt fields to add

Each scan resolves every entry (one REST call per alias or version) and mirrors the result as a
Triton repository in the cache: ``<cache>/<served name>/<mlflow version>/model.onnx`` (the version's
``.onnx`` artifact: the ``onnx`` flavor's file of an ``mlflow.onnx.log_model`` model, else the only
``.onnx`` file, with the files beside it such as external data) and a generated ``config.pbtxt`` with
``version_policy { specific { versions: [...] } }`` and the parameters ``mlflow_model``,
``mlflow_version``, ``mlflow_run_id`` and ``mlflow_alias`` (comma-separated, one per version, highest
first). Model versions are immutable, so a cached version is fetched again only when its files were
damaged. When an alias moves, the config's version list changes, so poll mode sees the model change
and swaps; the version left behind is deleted from the cache ``retain_s`` later. When MLflow cannot
be reached the last resolved state stays (nothing is unloaded because of an outage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import text_format

from onnxgate.core.registry.mirror import CacheDir, RemoteError, is_current, read_manifest, why, write_manifest
from onnxgate.core.serving import model_config, model_files
from onnxgate.core.serving.source import DEFAULT_MODEL_FILENAME, ModelSource
from onnxgate.core.urls import redact_url, url_secrets
from onnxgate.errors import GatewayError
from onnxgate_client.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MlflowModelSpec:
    """One served model: a registered model's alias or fixed versions, under ``serve_as`` or its own name."""

    name: str
    alias: str = ""
    versions: tuple[int, ...] = ()
    serve_as: str = ""
    config: str = ""  # config.pbtxt text; version_policy and the mlflow_* parameters are set over it

    @property
    def served_name(self) -> str:
        return self.serve_as or self.name


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace ``path`` with ``text`` unless it holds it already (its mtime then stays)."""
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return False
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


class MlflowRepository:
    """Models of the MLflow Model Registry, mirrored into a cache laid out as a Triton repository."""

    def __init__(self, models: Sequence[MlflowModelSpec], cache_dir: str | Path | None = None,
                 tracking_uri: str = "", *, retain_s: float = 60.0) -> None:
        if not models:
            raise RemoteError("--model-repository mlflow:// needs registry.mlflow.models in the config file")
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise RemoteError("--model-repository mlflow:// needs MLFLOW_TRACKING_URI or registry.mlflow.tracking_uri")
        try:
            import mlflow.artifacts
            from mlflow import MlflowClient
        except ImportError:
            raise RemoteError("--model-repository mlflow:// needs MLflow: pip install 'onnxgate[mlflow]'") from None
        mlflow.set_tracking_uri(uri)  # artifact URIs (runs:/, mlflow-artifacts:/) resolve against the global one
        self.url, self._secrets = redact_url(uri), url_secrets(uri)
        self._uri, self._client, self._download = uri, MlflowClient(tracking_uri=uri), mlflow.artifacts
        self.models = {spec.served_name: spec for spec in models}
        self.cache = CacheDir(cache_dir, retain_s)
        self._lock = threading.RLock()
        self._last: dict[str, ModelSource] = {}
        log.info("model repository mlflow:// (tracking server %s; models %s; cache %s)", self.url,
                 ", ".join(sorted(self.models)), self.cache.path)

    def scan(self) -> dict[str, ModelSource]:
        """Every configured model, resolved and cached (blocking)."""
        with self._lock:
            sources = {name: self._source(spec) for name, spec in sorted(self.models.items())}
            for name in {d.name for d in self.cache.path.iterdir()} - set(sources):  # prune keeps to its own
                self.cache.prune(name, set(), gone=True)
            return sources

    def find(self, name: str) -> ModelSource | None:
        """One configured model, resolved now, or None (blocking)."""
        spec = self.models.get(name)
        if spec is None:
            return None
        with self._lock:
            return self._source(spec)

    def close(self) -> None:
        self.cache.close()  # removes a private cache directory

    def registered(self, served: str) -> str | None:
        """The registered model behind served model ``served`` (None: not one of this registry's)."""
        spec = self.models.get(served)
        return spec.name if spec is not None else None

    def set_alias(self, served: str, version: int, alias: str) -> None:
        """Point ``alias`` of the registered model behind ``served`` at ``version`` (blocking)."""
        name = self.registered(served)
        if name is None:
            raise RemoteError(f"model '{served}' does not come from the MLflow registry")
        self._client.set_registered_model_alias(name, alias, str(version))

    def tag_version(self, served: str, version: int, key: str, value: str) -> None:
        """Tag ``version`` of the registered model behind ``served`` (blocking)."""
        name = self.registered(served)
        if name is None:
            raise RemoteError(f"model '{served}' does not come from the MLflow registry")
        self._client.set_model_version_tag(name, str(version), key, value)

    def _source(self, spec: MlflowModelSpec) -> ModelSource:
        name = spec.served_name
        model_dir = self.cache.path / name
        try:
            resolved = self._resolve(spec)
        except Exception as exc:  # MLflow unreachable, alias missing: keep what was resolved before
            log.error("model %s: cannot resolve %s in MLflow (%s): %s", name, _what(spec), self.url,
                      why(exc, self._secrets))
            return self._last.get(name) or ModelSource(name, model_dir, ())
        fetched = []
        for version, run_id in resolved:
            try:
                self._fetch(spec, version)
                fetched.append((version, run_id))
            except Exception as exc:
                log.error("model %s: MLflow version %d of %s not fetched: %s", name, version, spec.name,
                          why(exc, self._secrets))
        if not fetched and name in self._last:
            return self._last[name]
        config = model_config.parse_pbtxt(spec.config) if spec.config else mc.ModelConfig()
        config.ClearField("version_policy")
        config.version_policy.specific.versions.extend(sorted(v for v, _ in fetched))
        fetched.sort(reverse=True)
        for key, value in (("mlflow_model", spec.name), ("mlflow_alias", spec.alias),
                           ("mlflow_version", ",".join(str(v) for v, _ in fetched)),
                           ("mlflow_run_id", ",".join(r for _, r in fetched))):
            config.parameters[key].string_value = value
        try:
            self.cache.model_dir(name, create=True)
        except RemoteError as exc:  # an entry the cache will not write through: that model fails
            log.error("model %s: %s", name, exc.message)
            return ModelSource(name, model_dir, (), error=exc.message)
        if write_if_changed(model_dir / "config.pbtxt", text_format.MessageToString(config)):
            log.info("model %s: MLflow %s -> version(s) %s", name, _what(spec), [v for v, _ in fetched] or "none")
        self.cache.prune(name, {v for v, _ in fetched})
        self._last[name] = ModelSource(name, model_dir, tuple(sorted(v for v, _ in fetched)))
        return self._last[name]

    def _resolve(self, spec: MlflowModelSpec) -> list[tuple[int, str]]:
        """(version, run id) of every READY model version the spec names."""
        if spec.alias:
            found = [self._client.get_model_version_by_alias(spec.name, spec.alias)]
        else:
            found = []
            for v in spec.versions:
                try:
                    found.append(self._client.get_model_version(spec.name, str(v)))
                except Exception as exc:
                    log.error("model %s: MLflow version %d of %s: %s", spec.served_name, v, spec.name,
                              why(exc, self._secrets))
        ready = [mv for mv in found if str(getattr(mv, "status", "READY")) == "READY"]
        for mv in found:
            if mv not in ready:
                log.warning("model %s: MLflow version %s of %s is %s", spec.served_name, mv.version, spec.name,
                            mv.status)
        return [(int(mv.version), mv.run_id or "") for mv in ready]

    def _fetch(self, spec: MlflowModelSpec, version: int) -> None:
        """Download a version's artifacts and install its .onnx file and neighbours as ``<version>/``."""
        final = self.cache.path / spec.served_name / str(version)
        manifest = read_manifest(final)
        if manifest and is_current(final, manifest, {rel: e.get("remote") for rel, e in manifest.items()}):
            return
        download, staged = self.cache.staging(spec.served_name), self.cache.staging(spec.served_name)
        try:
            uri = self._client.get_model_version_download_uri(spec.name, str(version))
            got = Path(os.path.realpath(self._download.download_artifacts(artifact_uri=uri, dst_path=str(download),
                                                                          tracking_uri=self._uri)))
            if got != Path(os.path.realpath(download)) and not model_files.is_inside(got, os.path.realpath(download)):
                raise RemoteError("the version's artifacts were not downloaded into the cache")
            onnx_file = _onnx_file(got)  # resolved, inside ``got``: only the download's own files move
            for entry in onnx_file.parent.iterdir() if got.is_dir() else [onnx_file]:
                os.rename(entry, staged / (DEFAULT_MODEL_FILENAME if entry == onnx_file else entry.name))
            files = [p for p in staged.rglob("*") if p.is_file()]
            write_manifest(staged, {str(p.relative_to(staged)): ["mlflow", spec.name, version] for p in files})
            self.cache.install(staged, final)
        finally:
            shutil.rmtree(download, ignore_errors=True)
            shutil.rmtree(staged, ignore_errors=True)
        log.info("model %s: MLflow version %d of %s cached (%s)", spec.served_name, version, spec.name,
                 onnx_file.name)


def _what(spec: MlflowModelSpec) -> str:
    return f"{spec.name}@{spec.alias}" if spec.alias else f"{spec.name} versions {list(spec.versions)}"


def _onnx_file(root: Path) -> Path:
    """The model file in a downloaded version: the onnx flavor's, else the only (or only model.onnx)
    .onnx; resolved. Every path an MLmodel gives, and the file chosen, must lie inside the downloaded
    artifacts ``root`` (``model_files.resolve_inside``: relative, no ``..``, no symlink out), so that
    the files moved into the cache, and later deleted from it, are only the download's own."""
    if root.is_file():
        return root
    base = Path(os.path.realpath(root))
    for mlmodel in sorted(root.rglob("MLmodel")):
        if not model_files.is_inside(os.path.realpath(mlmodel), base):
            raise RemoteError("an MLmodel of the version's artifacts is a link out of them")
        with open(mlmodel, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        data = ((doc.get("flavors") or {}).get("onnx") or {}).get("data") if isinstance(doc, dict) else None
        if isinstance(data, str):
            rel = os.path.join(os.path.relpath(mlmodel.parent, root), data)
            try:
                path = model_files.resolve_inside(base, rel, "MLmodel flavors.onnx.data",
                                                  where="the model version's artifacts")
            except GatewayError as exc:
                raise RemoteError(exc.message) from None
            if path.is_file():
                return path
    found = [Path(p) for p in sorted({os.path.realpath(p) for p in root.rglob("*.onnx")})
             if model_files.is_inside(p, base) and Path(p).is_file()]
    named = [p for p in found if p.name == DEFAULT_MODEL_FILENAME]
    if len(found) == 1 or len(named) == 1:
        return found[0] if len(found) == 1 else named[0]
    raise RemoteError(f"{'no' if not found else len(found)} .onnx files in the version's artifacts: cannot tell "
                      "which to serve")
