"""The load generator (loadtests/loadgen/) against a real gateway: exact counts, no errors, JSON fields.

Short runs (about a second or two each) over gRPC unary, gRPC stream and HTTP, closed and open loop.
No assertion depends on wall-clock speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import loadgen  # noqa: E402
from loadtests.bench import models  # noqa: E402

from gateway import GatewayProcess  # noqa: E402

# The fields the package docstring of loadtests/loadgen/ documents for every run.
RUN_FIELDS = {
    "url", "transport", "model", "model_version", "grpc_mode", "http_client", "mode", "concurrency", "rate",
    "arrival", "batch_size", "processes", "cpus", "warmup_s", "duration_s", "requests_target", "elapsed_s",
    "requests", "successes", "errors", "errors_by_kind", "throughput_rps", "rows_per_s", "offered_rps",
    "latency_ms", "send_lag_ms", "client_cpu_s", "client_cpu_cores", "watched_cpu_cores", "machine_busy_cores",
}  # fmt: skip
LATENCY_FIELDS = {"min", "mean", "p50", "p90", "p99", "p999", "max"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    repo = models.build_repository(tmp_path_factory.mktemp("loadgen"), (models.BY_NAME["gemm16"],))
    with GatewayProcess(repo) as process:
        yield process


def _successes(gw: GatewayProcess) -> int:
    """The gateway's own count of successful gemm16 requests."""
    with urllib.request.urlopen(f"http://{gw.http_url}/v2/models/gemm16/stats", timeout=10) as reply:
        stats = json.loads(reply.read())
    return sum(s["inference_stats"]["success"]["count"] for s in stats["model_stats"])


def _check_run(run: dict, expected: int) -> None:
    assert set(run) >= RUN_FIELDS, sorted(RUN_FIELDS - set(run))
    assert set(run["latency_ms"]) == LATENCY_FIELDS
    assert run["errors"] == 0, run["errors_by_kind"]
    assert run["errors_by_kind"] == {}
    assert run["successes"] == expected
    assert run["requests"] == expected
    assert run["throughput_rps"] > 0
    assert run["rows_per_s"] == pytest.approx(run["throughput_rps"] * run["batch_size"])
    lat = run["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]


@pytest.mark.parametrize(
    ("scheme", "grpc_mode", "http_client"),
    [("grpc", "unary", "raw"), ("grpc", "stream", "raw"), ("http", "unary", "raw"), ("http", "unary", "aiohttp")],
)
def test_closed_loop_exact_request_count(gw: GatewayProcess, scheme: str, grpc_mode: str, http_client: str) -> None:
    url = f"grpc://{gw.grpc_url}" if scheme == "grpc" else f"http://{gw.http_url}"
    target = loadgen.Target(
        url, "gemm16", grpc_mode=grpc_mode, http_client=http_client, validate=True, timeout_s=20, batch_size=2
    )
    before = _successes(gw)
    [run] = loadgen.run_load(target, [loadgen.Phase(concurrency=6, requests=300, warmup_s=0.2)], processes=2)
    _check_run(run, 300)
    assert run["mode"] == "closed" and run["concurrency"] == 6 and run["processes"] == 2
    assert run["batch_size"] == 2 and run["rows_per_s"] == pytest.approx(2 * run["throughput_rps"])
    # The gateway served the counted requests plus the warm-up ones, nothing was lost.
    assert _successes(gw) - before >= 300


@pytest.mark.parametrize(("scheme", "stream"), [("grpc", False), ("grpc", True), ("http", False)])
def test_open_loop_exact_request_count(gw: GatewayProcess, scheme: str, stream: bool) -> None:
    url = f"grpc://{gw.grpc_url}" if scheme == "grpc" else f"http://{gw.http_url}"
    target = loadgen.Target(url, "gemm16", grpc_mode="stream" if stream else "unary", validate=True, timeout_s=20)
    [run] = loadgen.run_load(target, [loadgen.Phase(rate=150, requests=200, warmup_s=0.2)], processes=2)
    _check_run(run, 200)
    assert run["mode"] == "open" and run["rate"] == 150 and run["offered_rps"] == 150
    assert run["send_lag_ms"]["max"] is not None and run["send_lag_ms"]["max"] >= 0


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_duration_mode_counts_match_the_gateway(gw: GatewayProcess, scheme: str) -> None:
    """No warm-up: every request the gateway served in the run is one the load generator counted."""
    url = f"grpc://{gw.grpc_url}" if scheme == "grpc" else f"http://{gw.http_url}"
    target = loadgen.Target(url, "gemm16", inputs=[loadgen.TensorSpec.parse("x:FP32:16")], outputs=["y"])
    before = _successes(gw)
    [closed, opened] = loadgen.run_load(
        target,
        [
            loadgen.Phase(concurrency=8, duration_s=1.0, warmup_s=0.0),
            loadgen.Phase(rate=200, duration_s=1.0, warmup_s=0.0),
        ],
        processes=1,
    )
    served = _successes(gw) - before
    for run in (closed, opened):
        assert run["errors"] == 0, run["errors_by_kind"]
        assert run["elapsed_s"] == pytest.approx(1.0)
        assert set(run) >= RUN_FIELDS
    assert opened["successes"] == 200  # 200/s for 1 s, counted by intended send time
    assert closed["successes"] + opened["successes"] == served


def test_cli_prints_table_and_writes_json(gw: GatewayProcess, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "loadtests.loadgen", "--url", f"http://{gw.http_url}", "--model", "gemm16"]
    cmd += ["--concurrency", "1,4", "--requests", "100", "--warmup", "0.1", "--processes", "1", "--validate"]
    cmd += ["--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "req/s" in lines[1] and "p99.9_ms" in lines[1]  # the table header
    printed = json.loads(lines[-1])  # the JSON document is the last line
    written = json.loads(out.read_text())
    assert printed["loadgen"] == written["loadgen"] == 1
    assert [r["concurrency"] for r in written["runs"]] == [1, 4]
    for run in written["runs"]:
        _check_run(run, 100)


def test_cli_exit_code_and_error_kinds_for_an_unknown_model(gw: GatewayProcess, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "loadtests.loadgen", "--url", f"grpc://{gw.grpc_url}", "--model", "nope"]
    cmd += ["--input", "x:FP32:16", "--concurrency", "2", "--requests", "20", "--warmup", "0", "--processes", "1"]
    cmd += ["--format", "json", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    [run] = json.loads(out.read_text())["runs"]
    assert run["successes"] == 0 and run["errors"] == 20
    assert run["errors_by_kind"] == {"grpc:NOT_FOUND": 20}
    assert run["latency_ms"]["p50"] is None


def test_tensor_spec_and_latency_summary() -> None:
    assert loadgen.TensorSpec.parse("x:fp32:3x224x224") == loadgen.TensorSpec("x", "FP32", (3, 224, 224))
    assert loadgen.TensorSpec.parse("ns:a:INT64:4") == loadgen.TensorSpec("ns:a", "INT64", (4,))
    with pytest.raises(ValueError):
        loadgen.TensorSpec.parse("x:FLOAT:4")
    with pytest.raises(ValueError):
        loadgen.Phase(concurrency=1, rate=5)
    import numpy as np

    summary = loadgen.latency_summary(np.arange(1, 1001, dtype=float))
    assert summary["min"] == 1 and summary["max"] == 1000 and summary["p50"] == pytest.approx(500.5)
    assert summary["p999"] == pytest.approx(999.001)
