"""Sample logging and live drift through a real gateway: both transports, shadows, flush, gauges."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until

X = np.arange(8, dtype=np.float32).reshape(2, 4)
TRANSPORT_FIELDS = {"protocol", "time", "latency_s"}


def _infer(kind: str, gw: GatewayProcess, model: str, x: np.ndarray, request_id: str, user: str):
    mod = grpcclient if kind == "grpc" else httpclient
    client = mod.InferenceServerClient(gw.grpc_url if kind == "grpc" else gw.http_url)
    inp = mod.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], request_id=request_id, headers={"x-user-id": user}).as_numpy("y")


def _timeless(record: dict) -> dict:
    """A record without what depends on the transport or the clock."""
    out = {k: v for k, v in record.items() if k not in TRANSPORT_FIELDS}
    if out.get("shadow") and out["shadow"].get("comparison"):
        comparison = dict(out["shadow"]["comparison"])
        comparison.pop("latency_diff_s", None)
        out["shadow"] = {**out["shadow"], "comparison": comparison}
    return out


def _records(directory: Path) -> list[dict]:
    out = []
    for f in sorted(directory.glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_records_are_the_same_for_both_transports_and_carry_the_shadow(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "primary", scale=2.0)
    modelzoo.build_scaled(repo, "candidate", scale=3.0)
    logs = tmp_path / "log"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
routes:
  - name: scoring
    split: [{{target: primary, weight: 1}}]
    shadow: {{target: candidate, fraction: 1.0, max_in_flight: 8}}
sample_log:
  default: {{rate: 1.0}}
  include: [inputs, outputs, shadow]
  headers: [x-user-id]
  sink: {{type: jsonl, path: {logs}, rotate_mb: 1, rotate_s: 300}}
"""
    )
    with GatewayProcess(repo, ["--config", str(config)]) as gw:
        for kind in ("grpc", "http"):
            np.testing.assert_array_equal(_infer(kind, gw, "scoring", X, "req-1", "alice"), X * 2)
        np.testing.assert_array_equal(_infer("grpc", gw, "primary", X, "req-2", "bob"), X * 2)
        with pytest.raises(InferenceServerException):  # a failed request is recorded too
            _infer("http", gw, "primary", np.ones((1, 3), np.float32), "req-3", "carol")
    records = _records(logs)  # the gateway stopped: the queue was flushed and files renamed
    assert not list(logs.glob("*.part")) and not list(logs.glob(".*"))
    assert len(records) == 4, records
    by_protocol = {r["protocol"]: r for r in records if r["id"] == "req-1"}
    grpc_rec, http_rec = by_protocol["grpc"], by_protocol["http"]
    assert _timeless(grpc_rec) == _timeless(http_rec)
    assert grpc_rec["schema_version"] == 1
    assert grpc_rec["route"] == "scoring" and grpc_rec["model"] == "primary" and grpc_rec["version"] == "1"
    assert grpc_rec["headers"] == {"x-user-id": "alice"}
    assert grpc_rec["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 4], "values": X.tolist()}]
    assert grpc_rec["outputs"][0]["values"] == (X * 2).tolist()
    shadow = grpc_rec["shadow"]
    assert shadow["target"] == "candidate" and shadow["status"] == "ok"
    assert shadow["outputs"][0]["values"] == (X * 3).tolist()
    assert shadow["comparison"]["outputs"]["y"]["max_abs_diff"] == pytest.approx(float(np.abs(X).max()))
    plain = next(r for r in records if r["id"] == "req-2")
    assert plain["route"] == "primary" and plain["shadow"] is None
    failed = next(r for r in records if r["id"] == "req-3")
    assert failed["status"] == "InvalidInput" and "expected shape" in failed["error"] and failed["outputs"] == []


class _Hooks(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hooks.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_drift_gauge_rises_and_the_webhook_fires_on_shifted_traffic(tmp_path: Path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, "scored", scale=1.0)
    reference = tmp_path / "reference.npz"
    rng = np.random.default_rng(0)
    np.savez(reference, x=rng.normal(0, 1, (4000, 4)).astype(np.float32))
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
sample_log:
  default: {{rate: 1.0}}
  sink: {{type: none}}
drift:
  interval_s: 0.5
  webhook: http://127.0.0.1:{hooks.server_port}/alert
  models:
    scored: {{reference: {reference}, window: 400, min_rows: 200}}
"""
    )
    try:
        with GatewayProcess(repo, ["--config", str(config)]) as gw:
            client = httpclient.InferenceServerClient(gw.http_url)

            def send(x: np.ndarray) -> None:
                for chunk in np.array_split(x, 20):
                    inp = httpclient.InferInput("x", list(chunk.shape), "FP32")
                    inp.set_data_from_numpy(chunk)
                    client.infer("scored", [inp])

            def psi() -> float:
                text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics").read().decode()
                values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith('onnxgate_drift_psi{') and 'model="scored"' in line]
                return max(values) if values else -1.0

            send(rng.normal(0, 1, (400, 4)).astype(np.float32))
            assert wait_until(lambda: psi() >= 0, timeout=30), "no drift gauge after a full window"
            calm = psi()
            assert calm < 0.2 and not _Hooks.received
            send(rng.normal(3, 1, (400, 4)).astype(np.float32))  # every feature shifts by 3 sigma
            assert wait_until(lambda: psi() > 1.0, timeout=30), f"drift gauge did not rise (was {calm})"
            def alerted() -> list[str]:
                return sorted(h["feature"] for h in _Hooks.received if h.get("state") == "alert")

            # One alert per feature that crossed (all four shifted), not one per request.
            assert wait_until(lambda: len(alerted()) == 4, timeout=30), f"webhook alerts: {_Hooks.received}"
            assert all(h["model"] == "scored" for h in _Hooks.received)
            assert len(set(alerted())) == 4
            send(rng.normal(3, 1, (200, 4)).astype(np.float32))  # still drifted: no new alert
            time.sleep(1.5)  # three compute intervals
            assert len(alerted()) == 4, _Hooks.received
    finally:
        hooks.shutdown()
