"""Replicas behind a real load balancer (issue 7, item 2): nginx on loopback in front of three
gateway replicas, HTTP through an upstream with keep-alive and gRPC through ``grpc_pass``.

While tritonclient gRPC and HTTP threads send requests through nginx non-stop, a replica is
stopped with SIGTERM and a replacement started; later a new model version rolls across the
replicas one at a time. Both must lose nothing: zero failed requests, every answer exactly
``x * version`` for the version it names, and that version one allowed at that moment. Why
nginx can make this lossless without active health checks: see ``lb_helpers``.

Skipped where no nginx binary is installed (``.ci/run`` installs Debian's nginx-light).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

import modelzoo
import swap_helpers as sh
from gateway import GatewayProcess, wait_until
from lb_helpers import NGINX, Nginx, start_all, stop_all

# .ci/run installs nginx and sets ONNXGATE_REQUIRE_NGINX=1: there a missing nginx fails instead.
pytestmark = pytest.mark.skipif(NGINX is None and os.environ.get("ONNXGATE_REQUIRE_NGINX") != "1",
                                reason="nginx is not installed (apt-get install nginx-light)")

REPLICAS = 3
POLL_S = 0.25
# One intra-op thread each: three replicas, nginx and the clients share two cores.
ARGS = ["--drain-delay-s", "1", "--drain-timeout-s", "10", "--cpu-threads", "1",
        "--model-control-mode", "poll", "--repository-poll-secs", str(POLL_S)]


def replica_repos(tmp_path: Path) -> list[Path]:
    """One repository per replica, each holding ``scaled`` version 1 (``y = x * 1``)."""
    repos = []
    for i in range(REPLICAS):
        repo = tmp_path / f"replica{i}"
        modelzoo.build_scaled(repo, version=1, scale=1.0)
        repos.append(repo)
    return repos


def requests_served(gw: GatewayProcess) -> float:
    """Sum of ``onnxgate_requests_total`` over every label set: what this replica answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("onnxgate_requests_total{"))


def upstream_hits(lb: Nginx, port: int) -> int:
    """Requests the access log shows nginx sent to ``127.0.0.1:port`` (retries included)."""
    return len(re.findall(rf"127\.0\.0\.1:{port}\b", lb.access_log))


@pytest.fixture
def cluster(tmp_path):
    """(repositories, replicas, nginx): three ready replicas behind a running nginx."""
    if NGINX is None:
        pytest.fail("nginx is required (ONNXGATE_REQUIRE_NGINX=1) but not installed: apt-get install nginx-light")
    repos = replica_repos(tmp_path)
    replicas = [GatewayProcess(repo, ARGS) for repo in repos]
    start_all(replicas)
    lb = Nginx()
    try:
        lb.start(replicas)
        yield repos, replicas, lb
    finally:
        lb.stop()
        codes = stop_all(replicas)
    assert codes == [0] * REPLICAS, f"replicas did not drain cleanly: {codes}"


def retried(lb: Nginx) -> list[str]:
    """Access-log lines of requests nginx had to send to more than one replica."""
    return [line for line in lb.access_log.splitlines() if re.search(r"upstream=\S+, ", line)]


GRPC_STOP_RACE = pytest.mark.xfail(
    strict=False,
    reason="grpcio answers CANCELLED to a call that reaches the server as it stops (grpc/grpc#41785); "
    "nginx cannot retry a gRPC status. Taking the replica out of the balancer first is lossless.",
)


@pytest.mark.parametrize(
    "announced",
    [pytest.param(False, id="sigterm-only", marks=GRPC_STOP_RACE), pytest.param(True, id="removed-from-nginx-first")],
)
def test_replica_stopped_and_replaced_under_load_loses_nothing(cluster, announced):
    """``sigterm-only``: nginx learns of the stop only by failing over (connection refused, reset,
    GOAWAY). ``removed-from-nginx-first``: the replica is taken out of nginx (reload) as it gets
    SIGTERM, as an orchestrator would during the drain delay; nginx's old worker still finishes
    what it sent there. Then a replacement starts and joins nginx once ready (reload).

    Known gap, kept visible rather than tolerated: in ``sigterm-only`` a gRPC call that reaches the
    replica just as its gRPC server stops is answered CANCELLED by grpcio (grpc/grpc#41785), which
    nginx cannot retry (a gRPC status, not a transport error); it failed in about one run in five here."""
    repos, replicas, lb = cluster
    timeline = sh.Timeline("1")
    with sh.Load(lb, "scaled") as load:
        load.wait_answers(20)
        assert all(requests_served(r) > 0 for r in replicas), "nginx did not spread the load over every replica"

        # SIGTERM: readiness false, a second of serving (nginx keeps sending it requests), then
        # the listeners close and nginx fails over to the two others; in-flight requests finish.
        victim, hits = replicas[0], upstream_hits(lb, replicas[0].http_port)
        victim.signal()
        if announced:
            lb.configure(replicas[1:])
        assert wait_until(lambda: "draining: readiness false" in victim.log, 5), victim.log
        t_drain = time.monotonic()
        if not announced:
            time.sleep(0.5)
            assert upstream_hits(lb, victim.http_port) > hits, "the draining replica stopped serving at once"
        assert victim.proc is not None and victim.proc.wait(30) == 0, victim.log
        gone = time.monotonic()
        assert gone - t_drain >= 0.5, "the drain delay was not honoured"
        load.wait_answers(30, since=gone)  # two replicas carry it all

        # The replacement joins nginx (graceful reload) only once it reports ready.
        replacement = GatewayProcess(repos[0], ARGS).start()
        replicas[0] = replacement
        lb.configure(replicas)
        joined = time.monotonic()
        load.wait_answers(30, since=joined)
        assert wait_until(lambda: requests_served(replacement) >= 5, 20), "the replacement never took traffic"
        calls = sh.assert_clean(load, timeline, min_calls=50)
    assert {c.version for c in calls} == {"1"}
    # every phase had traffic on both transports: before, during the drain, with two, after
    for start, end in ((0, t_drain), (t_drain, gone), (gone, joined), (joined, float("inf"))):
        phase = [c for c in calls if start <= c.start < end]
        assert {c.transport for c in phase} == set(sh.TRANSPORTS), f"no traffic in phase {start}..{end}"
    if not announced:  # the failover really happened (connection refused once the listeners closed)
        assert retried(lb), f"nginx never had to fail over:\n{lb.error_log[-2000:]}"


def test_rolling_hot_swap_under_load_loses_nothing(cluster):
    repos, replicas, lb = cluster
    staging = repos[0].parent / "staging"
    modelzoo.build_scaled(staging, version=2, scale=2.0)
    timeline = sh.Timeline("1")
    with sh.Load(lb, "scaled") as load:
        load.wait_answers(20)
        timeline.mark("1", "2")
        for repo, replica in zip(repos, replicas, strict=True):
            # one replica at a time: copy the new version in, wait until that replica serves only it
            shutil.copytree(staging / "scaled" / "2", repo / "scaled" / "2")
            assert wait_until(lambda r=replica: sh.serving(r, "scaled") == {"2"}, 30), sh.states(replica, "scaled")
            load.wait_answers(5, since=time.monotonic())
        since = timeline.mark("2")
        load.wait_answers(30, since=since, version="2")
        calls = sh.assert_clean(load, timeline, min_calls=50)
    assert {c.version for c in calls} == {"1", "2"}
