"""perf_analyzer (Triton's own load tool) runs against the gateway with zero errors.

It reads metadata, config and, because the gateway lists the ``statistics`` extension, the
statistics before and after every window; one failed request aborts its run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway import GatewayProcess

WRAPPER = Path(
    os.environ.get("ONNXGATE_PERF_ANALYZER")
    or Path(os.environ.get("ONNXGATE_TOOLS", Path.home() / ".cache/onnxgate-tools")) / "perf_analyzer/perf_analyzer"
)


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    if not WRAPPER.exists():
        if os.environ.get("ONNXGATE_REQUIRE_PERF_ANALYZER") == "1":
            pytest.fail(f"perf_analyzer is required but missing at {WRAPPER}; run loadtests/get_perf_analyzer.sh")
        pytest.skip(f"perf_analyzer not installed at {WRAPPER}; run loadtests/get_perf_analyzer.sh")
    return WRAPPER


@pytest.fixture(scope="module")
def demo():
    with GatewayProcess() as gw:  # no --model-repository: the bundled demo repository
        yield gw


def _run(pa: Path, args: list[str]) -> subprocess.CompletedProcess:
    for _ in range(3):  # exit 2 = the measurement did not stabilise on a busy machine; measure again
        proc = subprocess.run([str(pa), *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 2:
            break
    return proc


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("model", "extra"), [("mlp", []), ("iris_classifier", ["-b", "4"])])
def test_perf_analyzer_runs_without_errors(perf_analyzer, demo, protocol, model, extra):
    url = demo.grpc_url if protocol == "grpc" else demo.http_url
    args = ["-m", model, "-u", url, "-i", protocol, "--concurrency-range", "1:4:3",
            "--measurement-mode", "time_windows", "-p", "500", "-s", "50", "-r", "6", *extra]
    proc = _run(perf_analyzer, args)
    assert proc.returncode == 0, f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Throughput:" in proc.stdout
    assert "error" not in proc.stderr.lower(), proc.stderr


def test_perf_analyzer_streams_over_grpc(perf_analyzer, demo):
    args = ["-m", "mlp", "-u", demo.grpc_url, "-i", "grpc", "--streaming", "--async", "--concurrency-range", "8",
            "--measurement-mode", "time_windows", "-p", "500", "-s", "50", "-r", "6"]
    proc = _run(perf_analyzer, args)
    assert proc.returncode == 0, f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Throughput:" in proc.stdout
