"""Shared pieces of the routing tests (issue 5): models with known answers, a config writer, small
clients for inference on both transports, the routes API and the metrics endpoint.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

import modelzoo
from gateway import GatewayProcess

TRANSPORTS = ("grpc", "http")
# The comparison pair: primary y = x @ W, shadow = the same with output columns 0 and 1 swapped.
PAIR_W = np.random.RandomState(5).randn(6, 5).astype(np.float32)
PAIR_PERM = [1, 0, 2, 3, 4]


def build_matmul(repo: Path, name: str, perm: list[int] | None = None) -> Path:
    """``x`` float32 [batch, 6] -> ``y`` = (x @ PAIR_W)[:, perm] float32 [batch, 5]. The permutation is a
    Gather of the product, so the shadow's columns are bit for bit the primary's, reordered."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if perm is None else "p"])]
    inits = [modelzoo._init("w", PAIR_W)]
    if perm is not None:
        nodes.append(helper.make_node("Gather", ["p", "perm"], ["y"], axis=1))
        inits.append(modelzoo._init("perm", np.array(perm, np.int64)))
    vi = helper.make_tensor_value_info
    return modelzoo._save(repo, name, 1, nodes, [vi("x", TensorProto.FLOAT, ["batch", 6])],
                          [vi("y", TensorProto.FLOAT, ["batch", 5])], inits)


def build_crash(repo: Path, name: str = "crash") -> Path:
    """Takes ``x`` float32 [batch, 4] like ``build_scaled`` (so requests validate) but fails inside ONNX
    Runtime on every run: it reshapes the input to 3 elements."""
    vi = helper.make_tensor_value_info
    return modelzoo._save(repo, name, 1, [helper.make_node("Reshape", ["x", "three"], ["y"])],
                          [vi("x", TensorProto.FLOAT, ["batch", 4])], [vi("y", TensorProto.FLOAT, [3])],
                          [modelzoo._init("three", np.array([3], np.int64))])


def build_renamed(repo: Path, name: str = "renamed") -> Path:
    """Takes ``x`` float32 [batch, 4] like ``build_scaled`` but answers ``z`` = x: no output in common."""
    vi = helper.make_tensor_value_info
    return modelzoo._save(repo, name, 1, [helper.make_node("Identity", ["x"], ["z"])],
                          [vi("x", TensorProto.FLOAT, ["batch", 4])], [vi("z", TensorProto.FLOAT, ["batch", 4])])


def write_routes(path: Path, routes: list[dict], server: Mapping | None = None) -> Path:
    doc: dict = {"routes": routes}
    if server:
        doc["server"] = dict(server)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def route(name: str, split: dict[str, float], sticky: str = "", shadow: dict | None = None) -> dict:
    doc: dict = {"name": name, "split": [{"target": t, "weight": w} for t, w in split.items()]}
    if sticky:
        doc["sticky"] = sticky
    if shadow:
        doc["shadow"] = shadow
    return doc


# -- inference ------------------------------------------------------------------------------------
class Clients:
    """One client per transport for a gateway (each used from one thread only)."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.grpc = grpcclient.InferenceServerClient(gw.grpc_url)
        self.http = httpclient.InferenceServerClient(gw.http_url)

    def infer(self, transport: str, model: str, x: np.ndarray, headers: dict | None = None,
              version: str = "") -> tuple[str, str, np.ndarray]:
        """(model_name, model_version, y) of the answer."""
        mod = grpcclient if transport == "grpc" else httpclient
        inp = mod.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client = self.grpc if transport == "grpc" else self.http
        result = client.infer(model, [inp], model_version=version, headers=headers)
        response = result.get_response()
        if transport == "grpc":
            return response.model_name, response.model_version, result.as_numpy("y")
        return response["model_name"], response["model_version"], result.as_numpy("y")

    def close(self) -> None:
        self.grpc.close()
        self.http.close()


# -- HTTP API and metrics -----------------------------------------------------------------------
def call(port: int, method: str, path: str, body: object = None) -> tuple[int, object]:
    """One HTTP request; (status, decoded JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, None if body is None else json.dumps(body).encode())
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def comparison(gw: GatewayProcess, name: str) -> dict:
    status, doc = call(gw.http_port, "GET", f"/v2/routes/{name}/comparison")
    assert status == 200, doc
    assert isinstance(doc, dict)
    return doc


def metrics(gw: GatewayProcess) -> dict[tuple[str, frozenset], float]:
    """Every sample of the metrics endpoint: (sample name, labels) -> value."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.metrics_port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def fan_out(gw: GatewayProcess, jobs: list, fn, threads: int = 4) -> list:
    """``fn(clients, job)`` for every job, on ``threads`` threads with their own clients; results in order."""
    results: list = [None] * len(jobs)

    def worker(k: int) -> None:
        clients = Clients(gw)
        try:
            for i in range(k, len(jobs), threads):
                results[i] = fn(clients, jobs[i])
        finally:
            clients.close()

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, k) for k in range(threads)]:
            f.result()
    return results


class Background:
    """Infer ``model`` over and over on both transports from one thread until stopped; every answer
    goes through ``check`` (which names the target or raises); errors are kept, not raised."""

    def __init__(self, gw: GatewayProcess, model: str, x: np.ndarray, check) -> None:
        self.answers: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gw, model, x, check), daemon=True)

    def _run(self, gw: GatewayProcess, model: str, x: np.ndarray, check) -> None:
        clients = Clients(gw)
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                self.answers.append(check(clients.infer(TRANSPORTS[i % 2], model, x)))
            except Exception as exc:  # every failure is a finding
                self.errors.append(repr(exc))
        clients.close()

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
