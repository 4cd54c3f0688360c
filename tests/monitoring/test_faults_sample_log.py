"""The sample log under faults, through real gateways: a collector that hangs, a disk that is full,
a shadow that fails every request. In each case every inference is answered, what is lost is
counted by reason, memory stays within ``queue_max_mb`` and SIGTERM still ends the gateway
cleanly (exit 0)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import modelzoo
from gateway import GatewayProcess, wait_until
from routing_helpers import build_crash, metric, metrics
from sample_log_helpers import Collector, tiny_tmpfs
from swap_helpers import rss_mb

TRANSPORTS = ("grpc", "http")
DROPPED = "onnxgate_sample_log_dropped_total"
WRITTEN = "onnxgate_sample_log_records_total"


class _Client:
    """tritonclient on both transports against one gateway."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.grpc = grpcclient.InferenceServerClient(gw.grpc_url)
        self.http = httpclient.InferenceServerClient(gw.http_url)

    def infer(self, transport: str, model: str, name: str, arr: np.ndarray, datatype: str, output: str) -> np.ndarray:
        mod = grpcclient if transport == "grpc" else httpclient
        inp = mod.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        client = self.grpc if transport == "grpc" else self.http
        result = client.infer(model, [inp])  # raises on any status but success
        return result.as_numpy(output)

    def upper(self, transport: str, text: str) -> str:
        y = self.infer(transport, "string", "text", np.array([[text]], dtype=object), "BYTES", "upper")
        value = y.reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    def close(self) -> None:
        self.grpc.close()
        self.http.close()


def _metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    """The sum of the gateway's samples called ``name`` whose labels include ``labels``."""
    return metric(metrics(gw), name, **labels)


def _config(path: Path, sample_log: str, extra: str = "") -> Path:
    path.write_text(f"sample_log:\n  default: {{rate: 1.0}}\n{sample_log}{extra}")
    return path


def _stop(gw: GatewayProcess) -> int:
    rc = gw.stop()
    assert rc == 0, f"exit status {rc} after SIGTERM:\n{gw.log[-4000:]}"
    return rc


def test_memory_behind_a_hanging_collector_stays_within_queue_max_mb(tmp_path: Path) -> None:
    """BYTES requests of 512 KiB strings, all sampled, while the collector never answers: each sample
    holds 1.5 MiB (the text, and the two outputs), the queue 4 MiB. Counted at 8 bytes per string,
    the queue took all of them (about 300 MiB); counted by size, it holds two or three and drops the
    rest as queue_full."""
    repo = tmp_path / "repo"
    modelzoo.build_string(repo)
    hold = threading.Event()
    n, size, queue_mb = 200, 512 * 1024, 4
    with Collector(hold=hold) as collector:
        sink = f"  sink: {{type: http, url: '{collector.url}', batch_size: 1, timeout_s: 60, retries: 0}}\n"
        config = _config(tmp_path / "gateway.yaml", f"  queue_max_mb: {queue_mb}\n" + sink)
        with GatewayProcess(repo, ["--config", str(config), "--drain-timeout-s", "2"]) as gw:
            client = _Client(gw)
            try:
                for i in range(4):  # the writer takes the first and hangs in its POST; the allocator warms up
                    assert client.upper(TRANSPORTS[i % 2], f"{i:06d}" + "w" * size) == f"{i:06d}" + "W" * size
                base, peak = rss_mb(gw), 0.0
                dropped_before = _metric(gw, DROPPED, reason="queue_full")
                for i in range(4, 4 + n):
                    text = f"{i:06d}" + "w" * size
                    assert client.upper(TRANSPORTS[i % 2], text) == text.upper()
                    peak = max(peak, rss_mb(gw))
                dropped = _metric(gw, DROPPED, reason="queue_full") - dropped_before
                assert client.upper("http", "still serving") == "STILL SERVING"
            finally:
                client.close()
            _stop(gw)  # the writer is still stuck in its POST: close gives up after the drain timeout
        hold.set()
    # 200 samples of 1.5 MiB is 300 MiB; the queue may hold 4 MiB (plus the one the writer is posting).
    assert peak - base < 4 * queue_mb + 64, f"RSS grew from {base:.0f} to {peak:.0f} MB"
    assert dropped >= n - 5, f"only {dropped} of {n} samples dropped as queue_full"


def test_a_hanging_collector_drops_as_collector_down_and_never_fails_inference(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "scaled", scale=2.0)
    hold = threading.Event()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Collector(hold=hold) as collector:
        sink = f"  sink: {{type: http, url: '{collector.url}', batch_size: 1, timeout_s: 0.5, retries: 0}}\n"
        config = _config(tmp_path / "gateway.yaml", sink)
        with GatewayProcess(repo, ["--config", str(config), "--drain-timeout-s", "2"]) as gw:
            client = _Client(gw)
            try:
                for i in range(40):
                    y = client.infer(TRANSPORTS[i % 2], "scaled", "x", x + i, "FP32", "y")
                    np.testing.assert_array_equal(y, (x + i) * 2)
                down = wait_until(lambda: _metric(gw, DROPPED, reason="collector_down") >= 1, timeout=30)
                assert down, gw.log[-2000:]
                for i in range(40, 60):  # with the circuit open, batches are dropped without waiting
                    y = client.infer(TRANSPORTS[i % 2], "scaled", "x", x + i, "FP32", "y")
                    np.testing.assert_array_equal(y, (x + i) * 2)
                assert _metric(gw, WRITTEN) == 0
            finally:
                client.close()
            _stop(gw)
        hold.set()


def test_a_full_disk_drops_as_disk_full_and_never_fails_inference(tmp_path: Path) -> None:
    """A 1 MiB tmpfs and records of about 100 KB (a 32 KiB string, its echo and upper case): the disk
    fills after about ten. Every request is still answered; every record is either in a complete file
    or counted as disk_full; no part file is left."""
    repo = tmp_path / "repo"
    modelzoo.build_string(repo)
    n, size = 60, 32 * 1024
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:
        logs = disk / "log"
        sink = f"  sink: {{type: jsonl, path: '{logs}', rotate_mb: 0.25, rotate_s: 300}}\n"
        config = _config(tmp_path / "gateway.yaml", sink)
        with GatewayProcess(repo, ["--config", str(config)]) as gw:
            client = _Client(gw)
            try:
                for i in range(n):
                    text = f"{i:06d}" + "d" * size
                    assert client.upper(TRANSPORTS[i % 2], text) == text.upper()

                def accounted() -> float:
                    return _metric(gw, WRITTEN) + _metric(gw, DROPPED, reason="disk_full")

                assert wait_until(lambda: accounted() >= n, timeout=30), (accounted(), gw.log[-2000:])
                lost = _metric(gw, DROPPED, reason="disk_full")
                assert _metric(gw, DROPPED, reason="io_error") == _metric(gw, DROPPED, reason="error") == 0
            finally:
                client.close()
            _stop(gw)
        files = sorted(logs.iterdir())
        assert not [p.name for p in files if p.name.startswith(".")], "a part file was left behind"
        kept = [json.loads(line) for p in files for line in p.read_text().splitlines()]  # every line whole
    assert lost > 0 and kept, (lost, len(kept))
    assert len(kept) + lost == n


def test_a_shadow_failing_every_request_fails_no_primary_and_is_logged(tmp_path: Path) -> None:
    """The shadow passes validation and then fails inside ONNX Runtime on every request."""
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary", scale=2.0)
    build_crash(repo, "crash")
    logs = tmp_path / "log"
    routes = "routes:\n  - name: scoring\n    split: [{target: primary, weight: 1}]\n"
    routes += "    shadow: {target: crash, fraction: 1.0, max_in_flight: 64}\n"
    config = _config(tmp_path / "gateway.yaml", f"  sink: {{type: jsonl, path: '{logs}'}}\n", routes)
    n = 40
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with GatewayProcess(repo, ["--config", str(config)]) as gw:
        client = _Client(gw)
        try:
            for i in range(n):
                y = client.infer(TRANSPORTS[i % 2], "scoring", "x", x + i, "FP32", "y")
                np.testing.assert_array_equal(y, (x + i) * 2)
            assert wait_until(lambda: _metric(gw, WRITTEN) >= n, timeout=30), gw.log[-2000:]
            assert _metric(gw, "onnxgate_requests_total", model="primary", outcome="success") == n
            assert _metric(gw, "onnxgate_requests_total", model="primary") == n, "every primary request succeeded"
            assert _metric(gw, "onnxgate_requests_total", model="crash", protocol="shadow", outcome="error") == n
        finally:
            client.close()
        _stop(gw)
    records = [json.loads(line) for p in sorted(logs.glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(records) == n
    for r in records:
        assert r["status"] == "ok" and r["route"] == "scoring" and r["model"] == "primary"
        assert r["shadow"]["target"] == "crash" and r["shadow"]["status"] == "InferenceFailed", r["shadow"]
        assert r["shadow"]["outputs"] == [] and r["shadow"]["comparison"] is None
