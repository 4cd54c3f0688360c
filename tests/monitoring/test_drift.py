"""Drift: the offline report on synthetic sample logs, and the live gauges and webhook."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from onnxgate import drift_report
from onnxgate.core.inference import InferInput, InferOutput, InferRequest, InferResponse
from onnxgate.core.monitoring.config import SampleLogConfig
from onnxgate.core.monitoring.drift import DriftConfig, DriftMonitor
from onnxgate.core.monitoring.drift_live import DriftMetrics, LiveDrift, _Ring
from onnxgate.core.monitoring.drift_stats import Thresholds, compare_feature
from onnxgate.core.monitoring.records import Sample
from onnxgate.core.monitoring.sample_log import SampleLogger
from onnxgate.errors import ConfigError

COLORS = np.array(["red", "green", "blue"])
BASE = (0.5, 0.3, 0.2)


def draw(rng: np.random.Generator, n: int, shift: float = 0.0, colors: tuple = BASE) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[:, 1] += shift
    return x, rng.choice(COLORS, size=n, p=colors)


def samples(seed: int, batches: int = 40, rows: int = 50, model: str = "m", **shift: object) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(batches):
        x, c = draw(rng, rows, **shift)
        request = InferRequest(
            model,
            "",
            [InferInput("x", "FP32", [rows, 3], x), InferInput("c", "BYTES", [rows], c.astype(object))],
            id=str(i),
        )
        y = InferOutput("y", "FP32", [rows], x.sum(axis=1))
        out.append(Sample(request, InferResponse(model, "1", [y]), None, model, model, "1", "grpc", 0.001))
    return out


def write_log(directory: Path, items: list[Sample], kind: str = "jsonl") -> Path:
    c = SampleLogConfig.from_dict({"default": {"rate": 1.0}, "sink": {"type": kind, "path": str(directory)}})
    logger = SampleLogger(c, CollectorRegistry())

    async def go() -> None:
        logger.start()
        for s in items:
            assert logger.offer(s)
        await logger.close(20)

    asyncio.run(go())
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift")
    x, c = draw(np.random.default_rng(1), 5000)
    np.savez(root / "train.npz", x=x, c=c)
    return {
        "npz": root / "train.npz",
        "same": write_log(root / "same", samples(2)),
        "shifted": write_log(root / "shifted", samples(3, shift=0.8), kind="parquet"),
        "colors": write_log(root / "colors", samples(4, colors=(0.2, 0.3, 0.5))),
        "earlier": write_log(root / "earlier", samples(5), kind="parquet"),
        "root": root,
    }


def report(tmp_path: Path, *args: str, plots: int = 0) -> tuple[int, dict]:
    out = tmp_path / "report.html"
    code = drift_report.main([*args, "--out", str(out), "--max-plots", str(plots)])
    summary = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    return code, summary


# -- the report ---------------------------------------------------------------------------------


def test_no_drift_exits_0(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, summary = report(tmp_path, "--reference", str(data["npz"]), "--current", str(data["same"]), "--json")
    assert code == 0 and summary["drifted"] == []
    assert json.loads(capsys.readouterr().out) == summary
    names = {f["name"]: f for f in summary["features"]}
    assert set(names) == {"x[0]", "x[1]", "x[2]", "c"}
    assert names["x[1]"]["type"] == "numeric" and names["c"]["type"] == "categorical"
    assert names["c"]["chi2_pvalue"] is not None and names["x[0]"]["ks_pvalue"] is not None
    assert summary["skipped"] == [{"name": "y", "reason": "not in the reference"}]
    assert summary["current_rows"] == 40 and summary["model"] == "m"


def test_shifted_feature_exits_1_and_is_named(data: dict[str, Path], tmp_path: Path) -> None:
    code, summary = report(tmp_path, "--reference", str(data["npz"]), "--current", str(data["shifted"]), plots=50)
    assert code == 1 and summary["drifted"] == ["x[1]"]
    shifted = next(f for f in summary["features"] if f["name"] == "x[1]")
    assert shifted["psi"] > 0.2 and shifted["ks_pvalue"] < 0.01 and shifted["reasons"] == ["psi", "ks"]
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "x[1]" in page


def test_categorical_shift_is_found_by_chi_square(data: dict[str, Path], tmp_path: Path) -> None:
    code, summary = report(tmp_path, "--reference", str(data["npz"]), "--current", str(data["colors"]))
    assert code == 1 and summary["drifted"] == ["c"]
    colors = next(f for f in summary["features"] if f["name"] == "c")
    assert colors["reasons"] == ["psi", "chi2"] and colors["chi2_pvalue"] < 1e-10


def test_earlier_log_as_reference_compares_outputs_too(data: dict[str, Path], tmp_path: Path) -> None:
    code, summary = report(tmp_path, "--reference", str(data["earlier"]), "--current", str(data["same"]))
    assert code == 0 and {f["name"]: f["kind"] for f in summary["features"]}["y"] == "output"
    code, summary = report(tmp_path, "--reference", str(data["earlier"]), "--current", str(data["shifted"]))
    assert code == 1 and summary["drifted"] == ["x[1]", "y"]


def test_thresholds_are_configurable(data: dict[str, Path], tmp_path: Path) -> None:
    args = ["--reference", str(data["npz"]), "--current", str(data["shifted"]), "--psi-threshold", "5"]
    code, summary = report(tmp_path, *args, "--ks-pvalue", "0", "--chi2-pvalue", "0")
    assert code == 0 and summary["thresholds"] == {"psi": 5.0, "ks_pvalue": 0.0, "chi2_pvalue": 0.0}


def test_csv_and_parquet_training_data(data: dict[str, Path], tmp_path: Path) -> None:
    x, c = draw(np.random.default_rng(6), 3000)
    csv = tmp_path / "train.csv"
    lines = ["sepal,petal,stem,color"] + [f"{a},{b},{d},{e}" for (a, b, d), e in zip(x.tolist(), c, strict=True)]
    csv.write_text("\n".join(lines) + "\n")
    code, summary = report(tmp_path, "--reference", str(csv), "--current", str(data["shifted"]))
    assert code == 1 and summary["drifted"] == ["x[1]"]
    assert summary["note"].startswith("matched by position: sepal -> x[0]")
    table = pa.table({"x[0]": x[:, 0], "x[1]": x[:, 1], "x[2]": x[:, 2], "c": c})
    pq.write_table(table, tmp_path / "train.parquet")
    code, summary = report(tmp_path, "--reference", str(tmp_path / "train.parquet"), "--current", str(data["same"]))
    assert code == 0 and summary["note"] == "" and len(summary["features"]) == 4


def test_usage_errors_exit_2(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref, cur = str(data["npz"]), str(data["same"])
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not parquet at all")
    two_models = write_log(tmp_path / "two", samples(7, batches=2) + samples(8, batches=2, model="other"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "x.txt").write_text("1,2\n")
    cases = [
        (["--reference", ref, "--current", str(tmp_path / "missing")], "no such file or directory"),
        (["--reference", str(garbage), "--current", cur], "broken.parquet"),
        (["--reference", ref, "--current", cur, "--model", "nope"], "no records for model 'nope'"),
        (["--reference", str(tmp_path / "x.txt"), "--current", cur], "expected a sample-log directory"),
        (["--reference", ref, "--current", str(two_models)], "several models (m, other)"),
        (["--reference", ref, "--current", str(empty)], "no records"),
        (["--current", cur], "--reference"),
    ]
    for args, message in cases:
        code, _ = report(tmp_path, *args)
        assert code == 2, args
        assert message in capsys.readouterr().err, args


def test_statistics_on_known_samples() -> None:
    rng = np.random.default_rng(0)
    same = compare_feature("f", rng.normal(size=4000), rng.normal(size=4000))
    moved = compare_feature("f", rng.normal(size=4000), rng.normal(0.5, size=4000))
    assert same.psi < 0.02 and same.ks_pvalue > 0.01 and not same.reasons(Thresholds())
    assert moved.psi > 0.2 and moved.ks_pvalue < 1e-10 and moved.reasons(Thresholds()) == ["psi", "ks"]
    ints = compare_feature("k", rng.integers(0, 4, 3000), rng.integers(0, 4, 3000))
    assert ints.categorical and ints.chi2_pvalue is not None and ints.ks_pvalue is None


# -- live drift -----------------------------------------------------------------------------------


class Webhook:
    """A real HTTP receiver on port 0 that keeps each JSON body; answers ``statuses`` first, then 200."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.bodies: list[dict] = []
        self.statuses = list(statuses)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = outer.statuses.pop(0) if outer.statuses else 200
                if status == 200:
                    outer.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_ring_keeps_the_last_window_rows() -> None:
    ring = _Ring(5, 2, np.float64)
    rows = np.arange(26, dtype=np.float64).reshape(13, 2)
    for chunk in (rows[:3], rows[3:4], rows[4:7], rows[7:13]):
        ring.push(chunk)
    assert sorted(ring.snapshot()[:, 0].tolist()) == [16, 18, 20, 22, 24]
    ring.push(np.zeros((9, 2)))
    assert ring.count == 5 and not ring.snapshot().any()


def feed(live: LiveDrift, rng: np.random.Generator, rows: int, **shift: object) -> None:
    for _ in range(rows // 50):
        x, c = draw(rng, 50, **shift)
        live.observe({"x": x, "c": c.astype(object)})


def gauge(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_live_gauges_rise_and_the_webhook_fires_once_per_crossing(data: dict[str, Path]) -> None:
    hook = Webhook(statuses=(503,))  # the first attempt fails: it is tried again at the next compute
    registry = CollectorRegistry()
    live = LiveDrift("m", data["npz"], metrics=DriftMetrics(registry), window=1000, min_rows=500, webhook=hook.url)
    rng = np.random.default_rng(11)
    try:
        feed(live, rng, 400)
        assert live.compute() == {} and gauge(registry, "onnxgate_drift_window_rows", model="m") == 400
        feed(live, rng, 600)
        results = live.compute()
        assert set(results) == {"x[0]", "x[1]", "x[2]", "c"}
        assert gauge(registry, "onnxgate_drift_psi", model="m", feature="x[1]") < 0.1
        assert gauge(registry, "onnxgate_drift_alert", model="m") == 0
        calm = gauge(registry, "onnxgate_drift_ks", model="m", feature="x[1]")
        feed(live, rng, 1000, shift=1.0)  # the whole window is now shifted traffic
        live.compute()
        assert gauge(registry, "onnxgate_drift_psi", model="m", feature="x[1]") > 0.5
        assert gauge(registry, "onnxgate_drift_ks", model="m", feature="x[1]") > calm
        assert gauge(registry, "onnxgate_drift_alert", model="m") == 1
        assert hook.bodies == [] and gauge(registry, "onnxgate_drift_webhook_failures_total", model="m") == 1
        live.compute()
        live.compute()
        assert [(b["state"], b["feature"]) for b in hook.bodies] == [("alert", "x[1]")]
        alert = hook.bodies[0]
        assert (
            alert["model"] == "m"
            and alert["psi"] > 0.5
            and alert["reasons"] == ["psi"]
            and alert["window_rows"] == 1000
        )
        feed(live, rng, 1000)  # back to normal
        live.compute()
        live.compute()
        assert [(b["state"], b["feature"]) for b in hook.bodies] == [("alert", "x[1]"), ("resolved", "x[1]")]
        assert gauge(registry, "onnxgate_drift_alert", model="m") == 0
    finally:
        hook.close()


def test_live_drift_through_the_sample_logger(data: dict[str, Path]) -> None:
    """Sampled requests reach the drift window on the writer thread; the monitor's own task computes."""
    registry = CollectorRegistry()
    config = DriftConfig.from_dict(
        {"interval_s": 0.05, "models": {"m": {"reference": str(data["npz"]), "window": 500, "min_rows": 500}}}
    )
    monitor = DriftMonitor(config, registry)
    c = SampleLogConfig.from_dict({"default": {"rate": 1.0}, "sink": {"type": "none"}})
    logger = SampleLogger(c, registry, rng=random.Random(0), observers=[monitor.observe])

    async def go() -> float | None:
        await monitor.start()
        logger.start()
        for s in samples(12, batches=10, shift=1.5):
            logger.offer(s)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if gauge(registry, "onnxgate_drift_alert", model="m") == 1:
                break
        await logger.close(5)
        await monitor.close()
        return gauge(registry, "onnxgate_drift_psi", model="m", feature="x[1]")

    assert asyncio.run(go()) > 0.5
    assert gauge(registry, "onnxgate_drift_alert", model="m") == 1


def test_positional_reference_and_observe_cost(tmp_path: Path) -> None:
    x, _ = draw(np.random.default_rng(2), 2000)
    csv = tmp_path / "train.csv"
    csv.write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in x.tolist()) + "\n")
    live = LiveDrift("m", csv, metrics=DriftMetrics(CollectorRegistry()), window=5000, min_rows=100)
    batch = {"x": np.random.default_rng(3).normal(size=(64, 3)).astype(np.float32)}
    started = time.perf_counter()
    for _ in range(2000):
        live.observe(batch)
    assert time.perf_counter() - started < 1.0  # vectorised: a few microseconds per call
    assert set(live.compute()) == {"x[0]", "x[1]", "x[2]"} and live.rows() == 5000


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"models": {"m": {"window": 10}}}, "drift.models.m.reference is required"),
        ({"models": {"m": {"reference": "r", "window": 10, "min_rows": 20}}}, "min_rows <= window"),
        ({"models": {"m": {"reference": "r", "psi": 1}}}, "unknown key(s) in drift.models.m: psi"),
        ({"interval_s": 0}, "drift.interval_s must be positive"),
        ({"webhook": "mailto:x"}, "drift.webhook must be an http(s) URL"),
        ({"models": {"m": {"reference": "r", "ks_pvalue": "low"}}}, "drift.models.m.ks_pvalue must be float"),
    ],
)
def test_drift_config_errors(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        DriftConfig.from_dict(section)
    assert message in err.value.message


def test_drift_config() -> None:
    c = DriftConfig.from_dict({"webhook": "http://h/x", "models": {"m": {"reference": "r.npz", "ks_pvalue": 0.001}}})
    m = c.models["m"]
    assert (m.reference, m.window, m.psi_threshold, m.ks_pvalue, m.chi2_pvalue) == ("r.npz", 5000, 0.2, 0.001, None)
