"""Model control: the repository API's load (with a config override, a pin or a rollback) and
unload, refused in model control mode ``none``; under ``--workers N`` made on every worker
(:mod:`~onnxgate.core.serving.control_share`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from onnxgate.core.inference import parse_version
from onnxgate.core.serving import manager as manager_mod
from onnxgate.core.serving import model_config
from onnxgate.core.serving.control_share import ModelControlShare, check_loaded
from onnxgate.core.serving.manager import ModelManager
from onnxgate.errors import InvalidInput, Unsupported
from onnxgate_client.pb import model_config_pb2 as mc

_NO_CONTROL = "model control mode 'none' does not allow %s; start with --model-control-mode explicit or poll"
_NOT_SHARED = (
    "%s is refused under --workers N: it would change only the worker process that took this call, "
    "not the others. Run with --workers 1, or change the repository or config file and restart the "
    "workers one at a time (SIGHUP to the supervisor re-reads the routes in every worker)"
)


class ModelControl:
    """Loads and unloads on the operator's behalf (module docstring)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.mode = "none"  # none | poll | explicit
        self.shared = True  # False in one of --workers N: a change here would reach only this worker
        self.share: ModelControlShare | None = None  # under --workers N: the workers' shared control state

    async def load(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """(Re)load ``name`` per the repository load API's parameters: ``config`` (JSON, merged
        over config.pbtxt and kept until a load without it), ``version`` (pin one version),
        ``rollback`` (pin the version that served before). Raises when a wanted version failed."""
        params = dict(params or {})
        if any(k.startswith("file:") for k in params):
            raise Unsupported("loading model files through the API is not supported")
        config_json = params.pop("config", None)
        if config_json is not None and not isinstance(config_json, str):
            raise InvalidInput("load parameter 'config' must be a string holding JSON")
        version = params.pop("version", None)
        if version is not None:
            if isinstance(version, str) and (number := parse_version(version)) is not None:
                version = number
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise InvalidInput(f"load parameter 'version' must be a positive integer, got {version!r}")
        rollback = params.pop("rollback", False)
        if not isinstance(rollback, bool):
            raise InvalidInput(f"load parameter 'rollback' must be a boolean, got {rollback!r}")
        if self.mode == "none":
            raise Unsupported(_NO_CONTROL % "loading")
        override = None
        if not rollback:
            override = model_config.parse_json(config_json) if config_json else None
            if version is not None:
                override = manager_mod.merge_config(override or mc.ModelConfig(), manager_mod.pin_config(version))

        async def load() -> None:
            check_loaded(name, await (self.manager.rollback(name) if rollback else self.manager.load(name, override)))

        what = "the rollback" if rollback else "the pin" if version is not None else "the load"
        await self._control(name, load, "loading (or pinning, or rolling back) a model", f"{what} of model '{name}'")

    async def unload(self, name: str) -> None:
        if self.mode == "none":
            raise Unsupported(_NO_CONTROL % "unloading")
        await self._control(name, lambda: self.manager.unload(name), "unloading a model",
                            f"the unload of model '{name}'")

    async def _control(self, name: str, action: Callable[[], Awaitable[None]], refused: str, what: str) -> None:
        """Run a model control ``action``: under ``--workers N`` on every worker (control_share)."""
        if self.share is None:
            self.check_shared(refused)
            await action()
        else:
            await self.share.change(name, action, what)

    def check_shared(self, what: str) -> None:
        """Refuse a control-plane change that would apply to this process only."""
        if not self.shared:
            raise Unsupported(_NOT_SHARED % what.capitalize())
