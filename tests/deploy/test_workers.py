"""``onnxgate serve --workers 2`` (issue 7, item 3): two worker processes share the HTTP and gRPC
ports (SO_REUSEPORT); the supervisor serves the metrics of both together, statistics add up
both from either, the supervisor restarts a worker that dies, and on SIGTERM drains every worker
and exits 0.

Restart backoff, orphaned workers and faults under load are in ``test_worker_faults.py``; the
control plane and statistics across workers in ``test_worker_control.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import modelzoo
from gateway import GatewayProcess, wait_until
from workers_helpers import (
    ARGS,
    Pinned,
    children,
    grpc_infer_fresh,
    listening_workers,
    metrics,
    pin_each,
    requests_total,
)

SLOW_ROWS = 128  # one request through 256 layers of 1024x1024: over half a second on one thread


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("workers_repo")
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    return repo


# -- tests ---------------------------------------------------------------------------------------
def test_two_workers_share_the_ports_and_their_metrics_add_up(repo):
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        workers = children(gw.proc.pid)
        assert len(workers) == 2, workers
        # both workers listen on both ports (the supervisor's own reservation is gone)
        assert listening_workers(gw, gw.http_port) == workers
        assert listening_workers(gw, gw.grpc_port) == workers

        hits: dict[int, int] = {}
        pinned = pin_each(gw, workers, hits)
        for n, (pid, p) in enumerate(sorted(pinned.items())):
            for _ in range(5 + 7 * n):  # unequal shares
                assert p.infer() == [[3.0, 6.0, 9.0, 12.0]]
            hits[pid] += 5 + 7 * n
        for _ in range(20):
            grpc_infer_fresh(gw)
        # either worker's statistics count every request, its own at once and the other's with
        # that one's next snapshot (test_worker_control.py has more)
        total = sum(hits.values()) + 20
        for p in pinned.values():
            assert wait_until(lambda p=p: p.served() == total, 30), (p.served(), hits)
        # the supervisor's metrics port adds up both workers
        assert requests_total(gw, "http") == sum(hits.values())
        assert requests_total(gw, "grpc") == 20
        text = metrics(gw)
        assert re.search(r'onnxgate_model_ready\{model="scaled",version="1"\} 1\.0', text), text[:2000]
    assert gw.proc.returncode == 0, gw.log


def test_killed_worker_is_restarted_and_serving_resumes(repo):
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        workers = children(gw.proc.pid)
        pinned = pin_each(gw, workers)
        before = requests_total(gw)
        victim, survivor = sorted(workers)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: re.search(rf"worker \d \(pid {victim}\) exited with -9; restarting", gw.log), 10), \
            gw.log
        # the survivor keeps serving meanwhile, on its connection and on fresh ones
        assert pinned[survivor].infer() == [[3.0, 6.0, 9.0, 12.0]]
        for _ in range(10):
            Pinned(gw).conn.close()  # each one asserts its answer
        # a new worker takes the dead one's place, listening on both ports once it has loaded
        assert wait_until(lambda: len(listening_workers(gw, gw.grpc_port)) == 2
                          and len(listening_workers(gw, gw.http_port)) == 2, 60), gw.log
        workers = children(gw.proc.pid)
        assert survivor in workers and victim not in workers and len(workers) == 2, workers
        (newcomer,) = workers - {survivor}
        hits: dict[int, int] = {}
        fresh = pin_each(gw, workers, hits)[newcomer]
        assert fresh.infer() == [[3.0, 6.0, 9.0, 12.0]]
        hits[newcomer] += 1
        for _ in range(10):
            grpc_infer_fresh(gw)
        # the killed worker's counts stay in the sum: counters never go down
        assert requests_total(gw) == before + 1 + 10 + sum(hits.values()) + 10
    assert gw.proc.returncode == 0, gw.log


def test_sigterm_drains_every_worker_and_exits_0(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, version=1, scale=3.0)
    # no batching: the warm-up runs one row, not the largest batch
    modelzoo.write_config(modelzoo.build_slow(repo, layers=256), "max_batch_size: 0\n")
    rows = np.random.RandomState(0).uniform(-1, 1, (SLOW_ROWS, 1024)).astype(np.float32)
    expected = modelzoo.reference_run(repo / "slow" / "1" / "model.onnx", {"x": rows})["y"]
    gw = GatewayProcess(repo, ARGS).start()
    results: dict[int, tuple[float, object]] = {}
    try:
        assert gw.proc is not None
        pinned = pin_each(gw, children(gw.proc.pid))

        def slow(pid: int, p: Pinned) -> None:
            try:
                got: object = np.asarray(p.infer("slow", rows.tolist()), np.float32)
            except Exception as exc:
                got = exc
            results[pid] = (time.monotonic(), got)

        threads = [threading.Thread(target=slow, args=item) for item in pinned.items()]
        for t in threads:
            t.start()
        time.sleep(0.2)
        t_signal = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert gw.proc.wait(60) == 0, gw.log
        for t in threads:
            t.join(30)
    finally:
        gw.kill()
    assert len(results) == 2, results
    for pid, (end, got) in results.items():
        assert isinstance(got, np.ndarray), f"worker {pid}: in-flight request failed: {got!r}"
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert end > t_signal, "the request was not in flight at the signal: make it slower"
    # two workers, then the supervisor (the log reader may still be catching up)
    assert wait_until(lambda: gw.log.count("onnxgate: stopped") == 3, 30), gw.log
    assert gw.log.count("draining: readiness false") == 2, gw.log


def test_sigterm_while_workers_start_or_restart_exits_0(repo):
    # SIGTERM before the workers have installed their handlers (they are still importing)
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1", "--model-repository", str(repo),
           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *ARGS]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening:" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(60) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    # SIGTERM while the supervisor waits to replace a dead worker: no replacement is started
    with GatewayProcess(repo, ARGS) as gw:
        assert gw.proc is not None
        victim, survivor = sorted(children(gw.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: f"(pid {victim}) exited with -9; restarting" in gw.log, 10), gw.log
        gw.signal(signal.SIGTERM)
        seen = set()
        while gw.proc.poll() is None:
            seen |= children(gw.proc.pid)
            time.sleep(0.02)
    assert gw.proc.returncode == 0, gw.log
    assert seen <= {survivor}, f"a replacement worker was started while stopping: {seen - {survivor}}"


def test_sighups_while_the_workers_drain_are_not_sent_to_them_and_the_exit_is_0(repo):
    # a draining worker drops its SIGHUP handler as it ends: a SIGHUP sent then would kill it (-1)
    with GatewayProcess(repo, [*ARGS, "--drain-delay-s", "0.5"]) as gw:
        assert gw.proc is not None
        gw.signal(signal.SIGTERM)
        while gw.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                gw.signal(signal.SIGHUP)
            time.sleep(0.01)
    assert gw.proc.returncode == 0, gw.log
    assert "exited with" not in gw.log, gw.log
