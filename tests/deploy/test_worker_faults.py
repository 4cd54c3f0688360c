"""``--workers N`` when things go wrong (issue 11): a worker that cannot start is restarted with
growing delays, workers exit when the supervisor is SIGKILLed, and a worker SIGKILLed under load
fails only its own in-flight requests and is replaced.

Delays are read from the supervisor's log lines, never measured; every wait polls a condition.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess, wait_until
from onnxgate.supervisor import Backoff
from workers_helpers import ARGS, Pinned, X, children, grpc_infer_fresh, listening_workers, pin_each

SLOW_ROWS = 32  # one request through 64 layers of 512x512: about a gigaflop, a good part of a second
RESTART = re.compile(r"worker (\d) \(pid (\d+)\) exited with (-?\d+); restarting it in ([\d.]+) s \(restart (\d+)\)")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("faults_repo")
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    # no batching: the warm-up runs one row, not the largest batch
    modelzoo.write_config(modelzoo.build_slow(repo, dim=512, layers=64), "max_batch_size: 0\n")
    return repo


def alive(pid: int) -> bool:
    """Whether any thread of process ``pid`` still runs. The leader shows as a zombie as soon as
    it has exited, while other threads (ONNX Runtime's, in a run) may still be dying and hold
    the process's files, its listening sockets included; only when every thread has exited are
    those closed."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:  # that thread is gone
            continue
    return False


class Supervised:
    """``onnxgate serve`` whose readiness is not waited for: its log is collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1"]
        cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def restarts(self) -> list[tuple[int, float, int]]:
        """(worker index, logged delay, restart number) of every restart, in log order."""
        return [(int(m[1]), float(m[4]), int(m[5])) for m in RESTART.finditer(self.log)]

    def __enter__(self) -> Supervised:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- restart backoff -----------------------------------------------------------------------------
def test_backoff_doubles_up_to_its_cap_and_starts_again_after_a_stable_run():
    b = Backoff(initial=0.5, maximum=30.0, stable_s=60.0)
    assert [b.after_exit(uptime=2.0) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.after_exit(uptime=60.0) == 0.5  # it had stayed up: a fresh sequence
    assert b.after_exit(uptime=1.0) == 1.0


def test_a_worker_that_cannot_start_is_restarted_ever_more_slowly_until_it_can(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    config = tmp_path / "gateway.yaml"
    # the supervisor does not look into the repository; each worker fails at start-up, exit 2:
    # its route names a model the repository does not have (yet)
    config.write_text("routes:\n  - name: r\n    split: later\n")
    with Supervised(["--model-repository", str(repo), "--config", str(config), *ARGS]) as sup:
        assert wait_until(lambda: sum(i == 0 for i, _, _ in sup.restarts()) >= 3
                          and sum(i == 1 for i, _, _ in sup.restarts()) >= 3, 180), sup.log
        assert "'later'" in sup.log, sup.log  # the workers said why
        assert "ready:" not in sup.log
        # built aside and moved in whole: a worker scanning meanwhile sees all of it or nothing
        modelzoo.build_scaled(tmp_path / "staging", name="later", version=1, scale=5.0)
        (tmp_path / "staging" / "later").rename(repo / "later")
        assert wait_until(lambda: "ready: 2 workers serving" in sup.log, 180), sup.log
        for index in (0, 1):
            mine = [(delay, n) for i, delay, n in sup.restarts() if i == index]
            assert [n for _, n in mine] == list(range(1, len(mine) + 1)), sup.log
            delays = [d for d, _ in mine]
            assert delays == [0.5 * 2**k for k in range(len(delays))], sup.log  # 0.5, 1, 2, 4 ...
            assert all(m[3] == "2" for m in RESTART.finditer(sup.log) if m[1] == str(index)), sup.log
        assert re.search(r"worker \d restarted as pid \d+ \(restart 3\)", sup.log), sup.log
        # once it could start, it serves
        conn = http.client.HTTPConnection("127.0.0.1", _port(sup.log, "http"), timeout=30)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]}
        conn.request("POST", "/v2/models/r/infer", json.dumps(body).encode())
        reply = json.loads(conn.getresponse().read())
        assert reply["model_name"] == "later" and reply["outputs"][0]["data"] == [5.0, 10.0, 15.0, 20.0], reply
        conn.close()
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.log


def _port(log: str, kind: str) -> int:
    m = re.search(rf"listening: .*?{kind} \S+:(\d+)", log)
    assert m, log
    return int(m[1])


# -- the supervisor dies -------------------------------------------------------------------------
def test_workers_exit_when_the_supervisor_is_sigkilled(repo):
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        workers = children(gw.proc.pid)
        assert len(workers) == 2, workers
        gw.proc.kill()  # no handler runs: nothing is forwarded to the workers
        gw.proc.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 120), \
            (f"workers outlived their supervisor: {[p for p in workers if alive(p)]}", gw.log)
    # each one saw the pipe close and drained (the log reader may still be catching up)
    assert wait_until(lambda: gw.log.count("onnxgate: stopped") == 2, 30), gw.log
    assert gw.log.count("supervisor gone: draining") == 2, gw.log
    assert gw.log.count("draining: readiness false") == 2, gw.log


# -- a worker dies under load --------------------------------------------------------------------
def _pinned_to(gw: GatewayProcess, pid: int, count: int) -> list[Pinned]:
    """``count`` connections accepted by worker ``pid`` (fresh connections until enough were)."""
    out: list[Pinned] = []
    for _ in range(200):
        p = Pinned(gw)
        if p.worker == pid:
            out.append(p)
            if len(out) == count:
                return out
        else:
            p.conn.close()
    raise AssertionError(f"the kernel sent only {len(out)} of {count} connections to worker {pid}")


def _slow_body(rows: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    return json.dumps(doc).encode()


def _send_slow(p: Pinned, body: bytes) -> None:
    p.conn.request("POST", "/v2/models/slow/infer", body)


def _answer(p: Pinned) -> np.ndarray:
    resp = p.conn.getresponse()
    doc = json.loads(resp.read())
    assert resp.status == 200, doc
    out = doc["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


class Load:
    """Inferences back to back on connections pinned to the surviving worker, on threads."""

    def __init__(self, pinned: list[Pinned]) -> None:
        self.stop = threading.Event()
        self.done = [0] * len(pinned)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i, p)) for i, p in enumerate(pinned)]

    def _run(self, i: int, p: Pinned) -> None:
        while not self.stop.is_set():
            try:
                assert p.infer() == [[3.0, 6.0, 9.0, 12.0]]
            except BaseException as exc:  # collected, asserted on by the test
                self.errors.append(exc)
                return
            self.done[i] += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def progress(self) -> Iterator[int]:
        return iter(list(self.done))


def test_a_worker_killed_under_load_fails_only_its_in_flight_requests_and_is_replaced(repo):
    rows = np.random.RandomState(0).uniform(-1, 1, (SLOW_ROWS, 512)).astype(np.float32)
    expected = modelzoo.reference_run(repo / "slow" / "1" / "model.onnx", {"x": rows})["y"]
    body = _slow_body(rows)  # encoded beforehand: sending it takes far less than computing it
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        victim, survivor = sorted(children(gw.proc.pid))
        doomed = _pinned_to(gw, victim, 2)
        steady = _pinned_to(gw, survivor, 2)
        with Load(steady) as load:
            assert wait_until(lambda: min(load.progress()) >= 3, 60), load.errors
            for p in doomed:
                _send_slow(p, body)  # sent, and far from answered: in flight on the victim
            os.kill(victim, signal.SIGKILL)
            failures = []
            for p in doomed:
                try:
                    _answer(p)
                except Exception as exc:
                    failures.append(exc)
            # only the victim's requests failed, each as a broken connection
            assert len(failures) == 2 and all(isinstance(e, ConnectionError) for e in failures), failures
            # a retry on a fresh connection succeeds (on the survivor, or the replacement) once the
            # victim is gone: until its exit has closed its listening sockets, the kernel may still
            # queue a new connection there, to be reset
            assert wait_until(lambda: not alive(victim), 30)
            retry = Pinned(gw)
            _send_slow(retry, body)
            assert np.allclose(_answer(retry), expected, rtol=1e-4, atol=1e-5)
            grpc_infer_fresh(gw)
            # the supervisor replaces the victim, which loads and listens on both ports again
            assert wait_until(lambda: re.search(rf"\(pid {victim}\) exited with -9; restarting", gw.log), 30), gw.log
            assert wait_until(lambda: len(listening_workers(gw, gw.http_port)) == 2
                              and len(listening_workers(gw, gw.grpc_port)) == 2, 120), gw.log
            before = list(load.progress())
            assert wait_until(lambda: all(a > b for a, b in zip(load.progress(), before, strict=True)), 60)
        assert not load.errors, load.errors  # the survivor's requests never failed
        workers = children(gw.proc.pid)
        assert survivor in workers and victim not in workers and len(workers) == 2, workers
        (newcomer,) = workers - {survivor}
        assert re.search(rf"worker \d restarted as pid {newcomer} \(restart 1\)", gw.log), gw.log
        # the replacement serves, on both transports
        fresh = pin_each(gw, workers)[newcomer]
        assert fresh.infer() == [[3.0, 6.0, 9.0, 12.0]]
        for _ in range(5):
            grpc_infer_fresh(gw)
    assert gw.proc.returncode == 0, gw.log
