"""Other projects' V2 clients (the KServe SDK, MLServer), each in a venv of its own.

Those packages pin protobuf, grpcio, fastapi and friends differently from the gateway (and from
each other: kserve wants starlette >= 1.3, mlserver a fastapi that caps it far lower), so they are
never installed into the gateway's environment. :func:`foreign_python` creates
``<repository root>/.foreign-venvs/<tool>`` on first use, pip-installs the tool's pinned
requirements there and returns that venv's ``python``; the tests drive the tool as a subprocess
(:func:`run_driver`, a script from ``foreign_drivers/`` that prints one JSON document).

A venv is reused while its marker file holds the same requirements and Python version; building
one is serialised by an ``flock`` on ``.foreign-venvs/<tool>.lock``, so two pytest runs at once
build it once. A failed or interrupted build leaves no marker and is rebuilt from scratch.

pip needs the network. Without it :func:`foreign_python` raises :class:`ForeignClientUnavailable`;
:func:`require_foreign_python` turns that into a test failure when ``ONNXGATE_REQUIRE_FOREIGN_CLIENTS=1``
(CI) and into a skip otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".foreign-venvs"
DRIVERS = Path(__file__).resolve().parent / "foreign_drivers"
MARKER = ".onnxgate-complete"
REQUIRE_ENV = "ONNXGATE_REQUIRE_FOREIGN_CLIENTS"
INSTALL_TIMEOUT_S = 900

# Exact versions of the tools themselves; their dependencies are what their own metadata allows.
# kserve 0.21: kserve.inference_client.InferenceRESTClient / InferenceGRPCClient, protobuf < 7.
# mlserver 1.7.1: `mlserver infer` (REST only: --transport grpc is refused as "not yet supported"),
# its pydantic V2 types and its gRPC stubs and converters; Python < 3.13.
TOOLS: dict[str, tuple[str, ...]] = {
    "kserve": ("kserve==0.21.0",),
    "mlserver": ("mlserver==1.7.1",),
}

_failures: dict[str, str] = {}  # tool -> why, so a failed install is tried once per pytest run


class ForeignClientUnavailable(RuntimeError):
    """The tool's venv could not be built (usually: pip could not reach the package index)."""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _spec(tool: str) -> dict:
    return {"requirements": list(TOOLS[tool]), "python": list(sys.version_info[:2])}


def _complete(venv: Path, spec: dict) -> bool:
    try:
        return json.loads((venv / MARKER).read_text()) == spec and _python(venv).exists()
    except (OSError, ValueError):
        return False


def _run(cmd: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise ForeignClientUnavailable(f"{' '.join(cmd[:4])} ... took over {timeout:.0f} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "is ignored" not in ln]
        tail = "\n".join(lines[-15:])  # without pip's notes on this machine's missing local index folders
        raise ForeignClientUnavailable(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")


def _build(tool: str, venv: Path, spec: dict) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    # From a venv, `-m venv` builds on the base interpreter: nothing of the gateway's packages leaks in.
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    pip = [str(_python(venv)), "-m", "pip", "install", "-q", "--no-input", "--timeout", "60", "--retries", "2"]
    _run([*pip, *TOOLS[tool]], timeout=INSTALL_TIMEOUT_S)
    (venv / MARKER).write_text(json.dumps(spec))


def foreign_python(tool: str) -> Path:
    """The ``python`` of ``tool``'s venv, built on first use; :class:`ForeignClientUnavailable` if it can't be."""
    if tool in _failures:
        raise ForeignClientUnavailable(_failures[tool])
    venv, spec = VENVS / tool, _spec(tool)
    if _complete(venv, spec):
        return _python(venv)
    VENVS.mkdir(exist_ok=True)
    with open(VENVS / f"{tool}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building it: wait for it, then reuse its venv
        try:
            if not _complete(venv, spec):
                _build(tool, venv, spec)
        except ForeignClientUnavailable as exc:
            shutil.rmtree(venv, ignore_errors=True)
            _failures[tool] = f"could not install {' '.join(TOOLS[tool])} into {venv}: {exc}"
            raise ForeignClientUnavailable(_failures[tool]) from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _python(venv)


def require_foreign_python(tool: str) -> Path:
    """:func:`foreign_python` for a fixture: fail under ``ONNXGATE_REQUIRE_FOREIGN_CLIENTS=1``, else skip."""
    import pytest

    try:
        return foreign_python(tool)
    except ForeignClientUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{tool} is required ({REQUIRE_ENV}=1) but unavailable: {exc}", pytrace=False)
        pytest.skip(f"{tool} client not available (pip install needs the package index; "
                    f"set {REQUIRE_ENV}=1 to make this a failure): {exc}")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without anything that points Python at the gateway's venv or sources."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return {**env, **(extra or {})}


def run_driver(python: Path, driver: str, plan: dict, timeout: float = 180) -> dict:
    """Run ``foreign_drivers/<driver>`` with ``python``, ``plan`` as JSON on stdin; its JSON from stdout."""
    proc = subprocess.run(
        [str(python), str(DRIVERS / driver)],
        input=json.dumps(plan), capture_output=True, text=True, timeout=timeout, env=clean_env(), check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{driver} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(f"{driver} printed no JSON:\n{proc.stdout}\n{proc.stderr}") from exc
