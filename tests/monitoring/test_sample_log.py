"""Sample logging: config, sampling, records, file sinks, drops and shutdown, with real threads
and files."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from onnxgate.core.inference import InferOutput, InferResponse
from onnxgate.core.monitoring.config import SampleLogConfig
from onnxgate.core.monitoring.drift_stats import log_files, read_records
from onnxgate.core.monitoring.records import Sample, ShadowResult, make_record
from onnxgate.core.monitoring.sample_log import SampleLogger
from onnxgate.errors import ConfigError, InvalidInput
from sample_log_helpers import Collector, cfg, run, sample, tiny_tmpfs, value, write_all

# -- config -----------------------------------------------------------------------------------


def test_config_from_issue_example() -> None:
    c = SampleLogConfig.from_dict(
        {
            "default": {"rate": 0.01},
            "models": {"fraud": {"rate": 0.5}},
            "include": ["inputs", "outputs", "shadow"],
            "headers": ["X-User-Id"],
            "sample_by": "header:X-User-Id",
            "sink": {"type": "parquet", "path": "./sample-log", "rotate_mb": 64, "rotate_s": 300},
        }
    )
    assert c.default_rate == 0.01 and c.rates["fraud"] == 0.5
    assert c.headers == ("x-user-id",) and c.hash_header == "x-user-id"
    assert c.sink.type == "parquet" and c.sink.rotate_mb == 64.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sink": {"type": "jsonl"}}, "sample_log.sink.path is required"),
        ({"sink": {"type": "jsonl", "path": "p", "url": "http://x"}}, "url not used by type jsonl"),
        ({"sink": {"type": "kafka"}}, "sample_log.sink.type must be one of"),
        ({}, "sample_log.sink is required"),
        ({"default": {"rate": 1.5}, "sink": {"type": "none"}}, "sample_log.default.rate must be a number from 0 to 1"),
        ({"models": {"a": {"share": 1}}, "sink": {"type": "none"}}, "sample_log.models.a must be {rate"),
        ({"include": ["inputs", "labels"], "sink": {"type": "none"}}, "sample_log.include: unknown labels"),
        ({"queue_size": 0, "sink": {"type": "none"}}, "sample_log.queue_size must be >= 1"),
        ({"sample_by": "cookie", "sink": {"type": "none"}}, "sample_log.sample_by must be"),
        ({"rate": 0.1, "sink": {"type": "none"}}, "unknown key(s) in sample_log: rate"),
        ({"sink": {"type": "http", "url": "ftp://x"}}, "sample_log.sink.url must be an http"),
        ({"sink": {"type": "http", "url": "http://x", "retries": "3"}}, "sample_log.sink.retries must be int"),
        ({"sink": {"type": "jsonl", "path": "p", "rotate_mb": 0}}, "sample_log.sink.rotate_mb must be positive"),
    ],
)
def test_config_errors_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        SampleLogConfig.from_dict(section)
    assert message in err.value.message


# -- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
def test_random_sampling_within_binomial_bounds(rate: float) -> None:
    c = SampleLogConfig.from_dict(
        {"default": {"rate": rate}, "models": {"all": {"rate": 1.0}}, "sink": {"type": "none"}}
    )
    logger = SampleLogger(c, CollectorRegistry(), rng=random.Random(1234))
    n = 20000
    hits = sum(logger.should_sample("m") for _ in range(n))
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(hits - n * rate) <= 4.5 * sigma, (hits, n * rate)
    assert all(logger.should_sample("all") for _ in range(100))


def test_route_rate_wins_over_model_rate() -> None:
    c = SampleLogConfig.from_dict(
        {"default": {"rate": 0.5}, "models": {"m": {"rate": 1.0}, "r": {"rate": 0.0}}, "sink": {"type": "none"}}
    )
    logger = SampleLogger(c, CollectorRegistry(), rng=random.Random(1))
    assert all(logger.should_sample("m") for _ in range(200))
    assert not any(logger.should_sample("m", route="r") for _ in range(200))


def test_header_hash_sampling_is_deterministic() -> None:
    c = SampleLogConfig.from_dict({"default": {"rate": 0.3}, "sample_by": "header:X-User-Id", "sink": {"type": "none"}})
    a = SampleLogger(c, CollectorRegistry(), rng=random.Random(1))
    b = SampleLogger(c, CollectorRegistry(), rng=random.Random(2))
    users = [f"user-{i}" for i in range(5000)]
    decisions = [a.should_sample("m", {"x-user-id": u}) for u in users]
    for _ in range(3):  # the same user always gets the same answer, whatever the rng
        assert [b.should_sample("m", {"x-user-id": u}) for u in users] == decisions
    sigma = math.sqrt(len(users) * 0.3 * 0.7)
    assert abs(sum(decisions) - 0.3 * len(users)) <= 4.5 * sigma
    # A larger rate keeps every user the smaller one sampled.
    wider = SampleLogger(
        SampleLogConfig.from_dict(
            {"default": {"rate": 0.6}, "sample_by": "header:x-user-id", "sink": {"type": "none"}}
        ),
        CollectorRegistry(),
    )
    assert all(wider.should_sample("m", {"x-user-id": u}) for u, d in zip(users, decisions, strict=True) if d)
    # Without the header the decision is random (at the same rate).
    no_header = [a.should_sample("m", {}) for _ in range(4000)]
    assert 0 < sum(no_header) < len(no_header)


# -- records ----------------------------------------------------------------------------------------


def _record(s: Sample, **kw: object) -> dict:
    return make_record(
        s.request,
        s.response,
        s.error,
        route=s.route,
        model=s.model,
        version=s.version,
        protocol=s.protocol,
        latency_s=s.latency_s,
        headers={"x-user-id": "u1"},
        when=s.time,
        **kw,
    )


def test_record_schema() -> None:
    r = _record(sample(1))
    assert r["schema_version"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["time"]) and r["time"].startswith(
        "2024-05-01T12:00:01"
    )
    assert (r["id"], r["route"], r["model"], r["version"], r["protocol"]) == ("r1", "route-m", "m", "1", "http")
    assert r["status"] == "ok" and r["error"] is None and r["latency_s"] == 0.002
    assert r["headers"] == {"x-user-id": "u1"}
    x, s = r["inputs"]
    assert x == {"name": "x", "datatype": "FP32", "shape": [2, 3], "values": [[0.25, 0.5, 0.75], [1.0, 1.25, 1.5]]}
    assert s == {"name": "s", "datatype": "BYTES", "shape": [2], "values": ["w1-0-é", "w1-1-é"]}
    assert r["outputs"] == [{"name": "y", "datatype": "INT64", "shape": [2], "values": [1, 2]}]
    assert r["shadow"] is None
    json.dumps(r)  # plain JSON types only


def test_grpc_and_http_give_identical_records() -> None:
    grpc_record, http_record = _record(sample(3, protocol="grpc")), _record(sample(3, protocol="http"))
    assert grpc_record.pop("protocol") == "grpc" and http_record.pop("protocol") == "http"
    assert grpc_record == http_record


def test_failed_request_record_and_include() -> None:
    r = _record(sample(2, error=InvalidInput("input 'x': wrong shape")))
    assert r["status"] == "InvalidInput" and r["error"] == "input 'x': wrong shape"
    assert r["outputs"] == [] and r["version"] == "" and len(r["inputs"]) == 2
    only_inputs = _record(sample(2), include=("inputs",))
    assert only_inputs["outputs"] is None and only_inputs["shadow"] is None and only_inputs["inputs"]
    big = _record(sample(2, rows=10), max_elements=10)
    assert big["inputs"][0]["values"] is None and big["inputs"][0]["shape"] == [10, 3]


def test_shadow_record() -> None:
    s = sample(4)
    shadow = ShadowResult("m/2", InferResponse("m", "2", [InferOutput("y", "INT64", [2], np.array([4, 6]))]))
    r = _record(s, shadow=shadow, comparison={"agree": 0.5, "max_abs_diff": np.float32(1.0)})
    assert r["shadow"] == {
        "target": "m/2",
        "version": "2",
        "status": "ok",
        "error": None,
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [2], "values": [4, 6]}],
        "comparison": {"agree": 0.5, "max_abs_diff": np.float32(1.0)},
    }


# -- file sinks -----------------------------------------------------------------------------------


def test_jsonl_and_parquet_hold_the_same_records(tmp_path: Path) -> None:
    samples = [sample(i) for i in range(50)] + [sample(50, error=InvalidInput("bad"))]
    registries = {}
    for kind in ("jsonl", "parquet"):
        registries[kind] = reg = CollectorRegistry()
        logger = SampleLogger(cfg({"type": kind, "path": str(tmp_path / kind)}), reg)
        assert all(run(write_all(logger, samples)))
        assert value(reg, "onnxgate_sample_log_records_total") == len(samples)
    from_jsonl, from_parquet = list(read_records(tmp_path / "jsonl")), list(read_records(tmp_path / "parquet"))
    assert from_jsonl == from_parquet and len(from_jsonl) == len(samples)
    assert from_jsonl[0]["headers"] == {"x-user-id": "u0"}  # allowlisted only, lower-case
    assert from_jsonl[-1]["status"] == "InvalidInput"
    table = pq.read_table(log_files(tmp_path / "parquet")[0])
    assert (
        table.schema.field("latency_s").type == "double" and table.schema.metadata[b"onnxgate.schema_version"] == b"1"
    )
    assert json.loads(table.column("inputs")[0].as_py())[0]["name"] == "x"


def _read_complete(path: Path) -> int:
    if path.suffix == ".jsonl":
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"", f"{path} ends mid-line"
        return sum(1 for line in lines[:-1] if json.loads(line))
    return pq.read_table(path).num_rows


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_readers_never_see_torn_files_and_size_rotation(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "log"
    seen: dict[str, int] = {}
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for path in log_files(directory) if directory.exists() else []:
                try:
                    seen[path.name] = _read_complete(path)
                except FileNotFoundError:
                    pass
                except Exception as exc:  # a torn file
                    errors.append(f"{path.name}: {exc!r}")

    thread = threading.Thread(target=reader)
    thread.start()
    reg = CollectorRegistry()
    logger = SampleLogger(cfg({"type": kind, "path": str(directory), "rotate_mb": 0.03}), reg)

    async def heavy() -> None:
        logger.start()
        for i in range(3000):
            logger.offer(sample(i, rows=4))
            if i % 100 == 0:
                await asyncio.sleep(0.005)
        await logger.close(20)

    try:
        run(heavy())
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    files = log_files(directory)
    assert len(files) > 3 and len(seen) > 1
    assert not [p for p in directory.iterdir() if p.name.startswith(".")], "part files left behind"
    assert sum(_read_complete(p) for p in files) == 3000 == value(reg, "onnxgate_sample_log_records_total")
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="queue_full") == 0


def test_rotation_by_age(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    logger = SampleLogger(cfg({"type": "jsonl", "path": str(directory), "rotate_s": 0.3}), CollectorRegistry())

    async def go() -> None:
        logger.start()
        logger.offer(sample(0))
        for _ in range(100):  # the file completes on its own while the logger runs
            await asyncio.sleep(0.05)
            if directory.exists() and log_files(directory):
                break
        assert [_read_complete(p) for p in log_files(directory)] == [1]
        logger.offer(sample(1))
        await logger.close(5)

    run(go())
    assert [_read_complete(p) for p in log_files(directory)] == [1, 1]


def test_close_flushes_within_timeout(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    logger = SampleLogger(cfg({"type": "parquet", "path": str(tmp_path)}), reg)
    started = time.monotonic()
    assert all(run(write_all(logger, [sample(i) for i in range(2000)], timeout=10)))
    assert time.monotonic() - started < 10
    assert len(list(read_records(tmp_path))) == 2000
    assert not logger.offer(sample(1)) and value(reg, "onnxgate_sample_log_dropped_total", reason="shutdown") == 1


def test_observers_see_inputs_of_successful_samples(tmp_path: Path) -> None:
    seen: list[tuple[str, str, tuple]] = []
    c = cfg({"type": "none"})
    logger = SampleLogger(
        c,
        CollectorRegistry(),
        observers=[lambda m, ins: seen.append((m, threading.current_thread().name, ins["x"].shape))],
    )
    run(write_all(logger, [sample(0), sample(1, error=InvalidInput("x")), sample(2, rows=5)]))
    assert seen == [("m", "onnxgate-sample-log", (2, 3)), ("m", "onnxgate-sample-log", (5, 3))]


# -- drops: full queue, unwritable or full disk ---------------------------------------------------


def test_full_queue_drops_and_counts_while_offer_never_waits_for_the_writer() -> None:
    hold = threading.Event()
    with Collector(hold=hold) as collector:  # the writer hangs in its first POST until released (or 20 s)
        reg = CollectorRegistry()
        c = cfg({"type": "http", "url": collector.url, "batch_size": 1, "timeout_s": 60}, queue_size=20)
        logger = SampleLogger(c, reg)

        async def go() -> tuple[list[bool], bool]:
            logger.start()
            results = []
            for i in range(500):
                results.append(logger.offer(sample(i)))
                if i == 0:  # the writer takes the first one and blocks on the collector
                    assert await asyncio.to_thread(collector.wait_arrived, 1)
            stuck = collector.held() == 1  # every offer returned while the writer was stuck on it
            hold.set()
            await logger.close(20)
            return results, stuck

        results, stuck = run(go())
    assert stuck
    refused = results.count(False)
    assert refused == 500 - 1 - 20  # the one being written and a full queue of 20 taken, the rest refused
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="queue_full") == refused
    assert len(collector.events()) == results.count(True) == value(reg, "onnxgate_sample_log_records_total")


def test_queue_byte_budget() -> None:
    reg = CollectorRegistry()
    size = sample(0, rows=2).nbytes()
    logger = SampleLogger(cfg({"type": "none"}, queue_max_mb=1.5 * size / 2**20), reg)  # one sample fits, not two
    assert logger.offer(sample(0, rows=2))
    assert not logger.offer(sample(1, rows=2))
    run(logger.close(1))  # never started: what is queued is dropped as shutdown
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="queue_full") == 1
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="shutdown") == 1


def test_unwritable_directory_drops_counts_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "log"
    blocker.write_text("a file where the directory should be")  # chmod does not stop root; this does
    reg = CollectorRegistry()
    logger = SampleLogger(cfg({"type": "jsonl", "path": str(blocker)}), reg)

    async def go() -> None:
        logger.start()
        assert all(logger.offer(sample(i)) for i in range(20))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if value(reg, "onnxgate_sample_log_dropped_total", reason="io_error") == 20:
                break
        blocker.unlink()  # the disk is back: the logger goes on writing
        assert all(logger.offer(sample(i)) for i in range(20, 30))
        await logger.close(5)

    run(go())
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="io_error") == 20
    assert [r["id"] for r in read_records(blocker)] == [f"r{i}" for i in range(20, 30)]


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 256 KiB tmpfs (needs root and mount rights; skipped otherwise)."""
    with tiny_tmpfs(tmp_path / "tiny", "256k") as mount:
        yield mount


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_disk_full_drops_counts_and_keeps_going(tiny_disk: Path, kind: str) -> None:
    reg = CollectorRegistry()
    logger = SampleLogger(cfg({"type": kind, "path": str(tiny_disk / "log"), "rotate_mb": 0.05}), reg)

    async def go() -> None:
        logger.start()
        for i in range(600):
            assert logger.offer(sample(i, rows=40, noisy=True))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await logger.close(10)

    run(go())
    lost = value(reg, "onnxgate_sample_log_dropped_total", reason="disk_full")
    kept = sum(_read_complete(p) for p in log_files(tiny_disk / "log"))  # whatever is there is whole
    assert lost > 0 and kept > 0
    assert not [p for p in (tiny_disk / "log").iterdir() if p.name.startswith(".")]
    assert kept + lost == 600 and value(reg, "onnxgate_sample_log_dropped_total", reason="error") == 0
