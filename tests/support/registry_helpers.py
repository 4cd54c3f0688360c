"""Real registry servers on loopback for the registry tests (issue 8): moto's standalone S3 server and
an MLflow tracking server (SQLite backend, local artifact store), each a subprocess of its own; plus
models whose answers name their version, with or without external data, and gateway helpers that skip
when ``onnxgate serve`` does not take a registry location yet. With ONNXGATE_REQUIRE_REGISTRY=1 (for CI,
once the extras are in ``[test]``) a missing package, server or wiring fails instead of skipping."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import pytest

import modelzoo
from gateway import GatewayProcess

REQUIRED = os.environ.get("ONNXGATE_REQUIRE_REGISTRY") == "1"
SECRET = "s3cr3t-never-logged-0123456789"  # the fake AWS secret key: must never appear in a log
BUCKET = "models"


def skip(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (ONNXGATE_REQUIRE_REGISTRY=1)")
    pytest.skip(reason)


def need(module: str, hint: str) -> ModuleType:
    """Import ``module``, or skip (fail when required) with ``hint``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        skip(f"{module} is not installed: {hint}")
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group, ready once ``url + health`` answers 200."""

    def __init__(self, cmd: list[str], port: int, health: str, log: Path, env: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.cmd, self.health, self.log_path, self.env = cmd, health, log, {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> Server:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[:4]} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.cmd[:4]} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group: mlflow server runs uvicorn as a child
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def s3_env(endpoint: str) -> dict[str, str]:
    """Standard AWS variables for a fake account on ``endpoint`` (boto and s3fs read them)."""
    return {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto(tmp: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Server(cmd, port, "/moto-api/", tmp / "moto.log").start(60)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=s3_env(endpoint)["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRET)


def upload(client: Any, prefix: str, files: dict[str, bytes]) -> None:
    """Put ``files`` (relative key -> bytes) under ``s3://models/<prefix>/``, in order."""
    for rel, data in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)


def delete(client: Any, prefix: str, *rels: str) -> None:
    for rel in rels:
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{rel}")


def scaled_bytes(tmp: Path, scale: float) -> bytes:
    """model.onnx of ``y = x * scale`` (x float32 [batch, 4])."""
    modelzoo.build_scaled(tmp / f"build-{scale}", version=1, scale=scale)
    return (tmp / f"build-{scale}" / "scaled" / "1" / "model.onnx").read_bytes()


def external_scaled(tmp: Path, scale: float) -> dict[str, bytes]:
    """``y = x * scale`` with its weight in external data: {"model.onnx": ..., "weights.bin": ...}."""
    out = tmp / f"external-{scale}"
    modelzoo.build_scaled(out, version=1, scale=scale)
    model = onnx.load(str(out / "scaled" / "1" / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return {"model.onnx": (out / "model.onnx").read_bytes(), "weights.bin": (out / "weights.bin").read_bytes()}


def start_mlflow(tmp: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
           "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes: starts faster
    return Server(cmd, port, "/health", tmp / "mlflow-server.log", env).start(240)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def start_gateway(location: str, args: list[str], env: dict[str, str], wired: str) -> GatewayProcess:
    """A gateway on ``location``; skips the test when this build does not serve such locations yet
    (the config's ``registry`` section is refused, or the log never mentions ``wired``)."""
    gw = GatewayProcess(location, args, env=env)  # type: ignore[arg-type]  # the flag takes a URL as well
    try:
        gw.start(120)
    except RuntimeError as exc:
        if "unknown section(s) in config file: registry" in str(exc):
            skip("onnxgate serve does not read the registry section yet (lifecycle/config not wired)")
        raise
    if wired not in gw.log:
        gw.stop()
        skip(f"onnxgate serve --model-repository {location} is not wired to the registry classes yet")
    return gw
