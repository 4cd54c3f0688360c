"""The ``registry`` config section and :func:`open_repository`, which picks the repository
class for a ``--model-repository`` location (a directory, an object-store URL or ``mlflow://``).

Importing this module never imports MLflow or fsspec: the repository classes do, when built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from onnxgate.core.registry.local import Repository
from onnxgate.core.registry.mlflow_repository import MlflowModelSpec, MlflowRepository
from onnxgate.core.registry.object_store import RemoteError, RemoteRepository
from onnxgate.core.serving import model_config
from onnxgate.errors import ConfigError, GatewayError


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """The ``registry`` section: the cache and object-store settings, and the MLflow models."""

    cache_dir: str = ""  # "" = a private temporary directory, removed at exit
    settle_s: float = 2.0
    retain_s: float = 60.0
    marker: str = ""
    verify_checksums: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    mlflow_tracking_uri: str = ""
    mlflow_models: tuple[MlflowModelSpec, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RegistryConfig:
        """Parse and check the section; raises ``ConfigError``."""
        try:
            return cls._parse({} if d is None else d)
        except ValueError as exc:
            raise ConfigError(f"registry: {exc}") from None

    @classmethod
    def _parse(cls, d: Any) -> RegistryConfig:
        _require(isinstance(d, Mapping), "must be a mapping")
        known = ("cache_dir", "settle_s", "retain_s", "marker", "verify_checksums", "storage_options", "mlflow")
        unknown = sorted(map(str, set(d) - set(known)))  # keys may be any YAML scalar: 1: x
        _require(not unknown, f"unknown key(s) {unknown}; known: {', '.join(known)}")
        for key in ("settle_s", "retain_s"):
            value = d.get(key, 0)
            _require(isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
                     f"{key} must be a number >= 0, got {value!r}")
        for key in ("cache_dir", "marker"):
            _require(isinstance(d.get(key, ""), str), f"{key} must be a string")
        _require("/" not in d.get("marker", ""), "marker must be a file name, not a path")
        _require(isinstance(d.get("verify_checksums", True), bool), "verify_checksums must be true or false")
        _require(isinstance(d.get("storage_options", {}), Mapping), "storage_options must be a mapping")
        ml = d.get("mlflow") or {}
        _require(isinstance(ml, Mapping) and not set(ml) - {"tracking_uri", "models"},
                 "mlflow must be a mapping with tracking_uri and models")
        _require(isinstance(ml.get("tracking_uri", ""), str), "mlflow.tracking_uri must be a string")
        models = ml.get("models") or []
        _require(isinstance(models, list), "mlflow.models must be a list")
        specs = tuple(_spec(entry, f"mlflow.models[{i}]") for i, entry in enumerate(models))
        served = [s.served_name for s in specs]
        _require(len(set(served)) == len(served), f"mlflow.models serve a name twice: {served} (use serve_as)")
        return cls(
            cache_dir=d.get("cache_dir", ""), settle_s=float(d.get("settle_s", 2.0)),
            retain_s=float(d.get("retain_s", 60.0)), marker=d.get("marker", ""),
            verify_checksums=d.get("verify_checksums", True), storage_options=dict(d.get("storage_options", {})),
            mlflow_tracking_uri=ml.get("tracking_uri", ""), mlflow_models=specs,
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _spec(entry: Any, where: str) -> MlflowModelSpec:
    _require(isinstance(entry, Mapping), f"{where} must be a mapping")
    unknown = set(entry) - {"name", "alias", "versions", "serve_as", "config"}
    _require(not unknown, f"{where}: unknown key(s) {sorted(map(str, unknown))}")
    for key in ("name", "alias", "serve_as", "config"):
        _require(isinstance(entry.get(key, ""), str), f"{where}.{key} must be a string")
    name, alias, versions = entry.get("name", ""), entry.get("alias", ""), entry.get("versions", [])
    _require(bool(name), f"{where} needs a name")
    _require(isinstance(versions, list) and all(type(v) is int and v > 0 for v in versions),
             f"{where}.versions must be a list of positive integers")
    _require(bool(alias) != bool(versions), f"{where} needs either an alias or versions, not both")
    serve_as, config = entry.get("serve_as", ""), entry.get("config", "")
    spec = MlflowModelSpec(name, alias, tuple(sorted(set(versions))), serve_as, config)
    _require("/" not in spec.served_name and not spec.served_name.startswith("."),
             f"{where}: '{spec.served_name}' cannot be a model name (use serve_as)")
    if spec.config:
        try:
            parsed = model_config.parse_pbtxt(spec.config, f"{where}.config")
        except GatewayError as exc:
            raise ValueError(exc.message) from None
        _require(parsed.name in ("", spec.served_name), f"{where}.config names another model: {parsed.name!r}")
    return spec


def open_repository(location: str, registry: RegistryConfig | None = None) -> Any:
    """The repository for ``--model-repository``: a directory (``Repository``), ``mlflow://``
    (``MlflowRepository``) or any other URL (``RemoteRepository``). Raises ``RemoteError``."""
    registry = registry or RegistryConfig()
    scheme = urlsplit(location).scheme if "://" in location else ""
    if scheme == "mlflow":
        if location.rstrip("/") != "mlflow:":
            raise RemoteError("use --model-repository mlflow:// (the tracking URI comes from MLFLOW_TRACKING_URI)")
        return MlflowRepository(registry.mlflow_models, registry.cache_dir or None, registry.mlflow_tracking_uri,
                                retain_s=registry.retain_s)
    if scheme:
        return RemoteRepository(location, registry.cache_dir or None, registry.storage_options,
                                settle_s=registry.settle_s, retain_s=registry.retain_s, marker=registry.marker,
                                verify_checksums=registry.verify_checksums)
    return Repository(Path(location))
