"""What the rollout end-to-end tests (``tests/traffic/test_rollouts.py``) build and drive: the
models and their scales, a route's rollout config, a webhook receiver, the rollout API, and the
clients that send traffic and check every reply."""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import yaml
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess, wait_until
from routing_helpers import call, metric, metrics

# Every model takes x float32 [batch, 4] and answers y = x * scale (the crash version: see build_crash_version).
SCALES = {
    "prim": 1.0,
    "prim2": 1.0,
    "good": 1.0,
    "bad": -1.0,
    "flaky_c": 1.0,
    "ops_c": 1.0,
    "abort_c": 1.0,
    "gone_c": 1.0,
    "pin_c": 1.0,
}
ROWS = 2  # rows per request: each comparison judges ROWS argmax rows
EVERY_S = 0.1  # rollouts.evaluate_every_s
# The latency gate's upper bound is the candidate's slowest run over the primary's 98th percentile: it
# must see execution times on both sides to pass, but a shared machine's scheduling noise must not fail it.
ALL_GATES = {"agreement_min": 0.9, "abs_diff_p99_max": 0.05, "error_rate_max": 0.05, "latency_p99_ratio_max": 10_000}
GATE_NAMES = ("agreement", "abs_diff_p99", "error_rate", "latency_p99_ratio")
QUICK_GATES = {"agreement_min": 0.9, "error_rate_max": 0.05}  # pass after 59 candidate requests
NEVER = 1_000_000  # min_comparisons that no test reaches: the gates never pass
STEPS = ["shadow", 10, 50, 100]


# -- models, config, webhook -------------------------------------------------------------------
def build_crash_version(repo: Path, name: str, version: int) -> Path:
    """A version that takes x float32 [batch, 4] like the others (requests validate, the default
    warm-up is only skipped) but fails inside ONNX Runtime on every run: x reshaped to 3 elements."""
    vi = helper.make_tensor_value_info
    return modelzoo._save(
        repo,
        name,
        version,
        [helper.make_node("Reshape", ["x", "three"], ["y"])],
        [vi("x", TensorProto.FLOAT, ["batch", 4])],
        [vi("y", TensorProto.FLOAT, [3])],
        [modelzoo._init("three", np.array([3], np.int64))],
    )


def rollout(candidate: str, **overrides: Any) -> dict:
    doc = {
        "candidate": candidate,
        "steps": STEPS,
        "min_dwell_s": 0.5,
        "max_step_s": 60,
        "min_comparisons": NEVER,
        "confidence": 0.95,
        "gates": QUICK_GATES,
        "on_fail": "rollback",
        "on_timeout": "hold",
    }
    doc.update(overrides)
    return doc


def route(name: str, primary: str, **ro: Any) -> dict:
    return {"name": name, "split": [{"target": primary, "weight": 100}], "rollout": rollout(**ro)}


def write_config(path: Path, routes: list[dict], webhook: str | None = None, state_dir: str = "") -> Path:
    if webhook:
        routes = [{**r, "rollout": {**r["rollout"], "webhook": webhook}} if "rollout" in r else r for r in routes]
    doc = {
        "rollouts": {"state_dir": state_dir, "evaluate_every_s": EVERY_S, "mirror_max_in_flight": 64},
        "routes": routes,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


class Webhook:
    """A local endpoint collecting every POST: (content type, decoded JSON body), in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        received = self.events

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((self.headers.get("content-type", ""), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, name: str) -> list[dict]:
        return [e for _, e in list(self.events) if e.get("data", {}).get("route") == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the rollout API -------------------------------------------------------------------------------
def summary(gw: GatewayProcess, name: str) -> dict:
    status, doc = call(gw.http_port, "GET", f"/v2/routes/{name}/rollout")
    assert status == 200 and isinstance(doc, dict), (status, doc)
    return doc


def act(gw: GatewayProcess, name: str, action: str, body: dict | None = None) -> tuple[int, Any]:
    return call(gw.http_port, "POST", f"/v2/routes/{name}/rollout/{action}", body)


def decisions(doc: dict) -> list[str]:
    return [h["decision"] for h in doc["history"]]


def where(doc: dict) -> tuple:
    """(phase, step_index, candidate_weight, mirroring) of a rollout's summary."""
    return doc["phase"], doc["step_index"], doc["candidate_weight"], doc["mirroring"]


def entry(h: dict) -> tuple:
    """(decision, from_step, to_step, weight, phase, by, alert) of a history entry or a decision."""
    return h["decision"], h["from_step"], h["to_step"], h["weight"], h["phase"], h["by"], h["alert"]


def rollout_metrics(gw: GatewayProcess, name: str) -> dict[str, float]:
    m = metrics(gw)
    out = {k: metric(m, f"onnxgate_rollout_{k}", route=name) for k in ("step", "candidate_weight", "comparisons")}
    for phase in ("running", "paused", "holding", "rolled_back", "completed", "aborted"):
        out[phase] = metric(m, "onnxgate_rollout_active", route=name, phase=phase)
    for d in ("advance", "complete", "hold", "rollback", "pause", "resume", "promote", "abort"):
        out[d] = metric(m, "onnxgate_rollout_decisions_total", route=name, decision=d)
    return out


# -- traffic ---------------------------------------------------------------------------------------
class Client:
    """One thread's client: JSON over one HTTP connection and gRPC, alternating. ``infer`` gives the
    answering model's name (its answer checked) or ``error:<status>`` for a failed request."""

    def __init__(self, gw: GatewayProcess, seed: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
        self.grpc = grpcclient.InferenceServerClient(gw.grpc_url)
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def infer(self, name: str) -> str:
        x = self.rng.standard_normal((ROWS, 4), dtype=np.float32)
        self.n += 1
        if self.n % 2:
            body = {"inputs": [{"name": "x", "shape": [ROWS, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
            self.conn.request(
                "POST", f"/v2/models/{name}/infer", json.dumps(body).encode(), {"content-type": "application/json"}
            )
            reply = self.conn.getresponse()
            doc = json.loads(reply.read())
            if reply.status != 200:
                return f"error:{reply.status}"
            model, y = doc["model_name"], np.array(doc["outputs"][0]["data"], np.float32).reshape(ROWS, 4)
        else:
            inp = grpcclient.InferInput("x", [ROWS, 4], "FP32")
            inp.set_data_from_numpy(x)
            try:
                result = self.grpc.infer(name, [inp])
            except InferenceServerException as exc:
                return f"error:{exc.status()}"
            model, y = result.get_response().model_name, result.as_numpy("y")
        assert model in SCALES, model
        np.testing.assert_array_equal(y, x * np.float32(SCALES[model]), err_msg=f"{name} answered by {model}")
        return model

    def close(self) -> None:
        self.conn.close()
        self.grpc.close()


def burst(gw: GatewayProcess, name: str, per_thread: int = 8, threads: int = 3) -> list[str]:
    """``per_thread`` requests from each of ``threads`` threads; every outcome (see Client.infer)."""

    def one(k: int) -> list[str]:
        client = Client(gw, k)
        try:
            return [client.infer(name) for _ in range(per_thread)]
        finally:
            client.close()

    with ThreadPoolExecutor(threads) as pool:
        return [o for outcomes in pool.map(one, range(threads)) for o in outcomes]


def drive(gw: GatewayProcess, name: str, until, timeout: float = 30.0, **kw: Any) -> list[str]:
    """Bursts until ``until(summary)`` holds (checked between bursts); every outcome."""
    seen: list[str] = []
    assert wait_until(lambda: until(summary(gw, name)) or seen.extend(burst(gw, name, **kw)), timeout, 0), (
        summary(gw, name),
        seen[-20:],
    )
    return seen


class Load:
    """A steady load on route ``name`` from ``threads`` threads until stopped; every outcome in the
    order the replies came back."""

    def __init__(self, gw: GatewayProcess, name: str, threads: int = 3) -> None:
        self.outcomes: list[str] = []
        self._order = itertools.count()
        self._got: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(gw, name, k), daemon=True) for k in range(threads)]
        self.failures: list[str] = []

    def _run(self, gw: GatewayProcess, name: str, k: int) -> None:
        client = Client(gw, 100 + k)
        try:
            while not self._stop.is_set():
                outcome = client.infer(name)
                self._got.append((next(self._order), outcome))
        except Exception as exc:  # a wrong answer: a finding
            self.failures.append(repr(exc))
        finally:
            client.close()

    def __len__(self) -> int:
        return len(self._got)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.outcomes = [o for _, o in sorted(self._got)]
