"""The sandboxed management API: what a config override given to the repository load API (HTTP
``POST /v2/repository/models/{name}/load`` with ``{"parameters": {"config": ...}}``, gRPC
``RepositoryModelLoad``) may name and ask for.

Every file a config names stays inside its model's directory (``serving/model_files.py``): the model
file inside the version directory, warm-up data inside ``<model>/warmup``, label files inside the
model directory; no absolute path, no ``..``, no symlink out, only regular files (a FIFO never blocks
the load), of bounded size. Refusals are 400 / INVALID_ARGUMENT with one message for every name
that leaves the directory, whether or not something exists where it points. Config values that would
cost unbounded resources are refused naming the limit. After every refusal the model keeps serving
what it served, and so do the others. And the URLs the gateway logs (the sample log's collector, the
drift webhook) show no credentials.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

import modelzoo
import swap_helpers as sh
from gateway import GatewayProcess, wait_until
from onnxgate.core.monitoring.drift_live import DriftMetrics, LiveDrift
from onnxgate.core.monitoring.drift_stats import FeatureTable
from onnxgate.core.monitoring.http_sink import post
from onnxgate.core.serving.model_config import (
    MAX_INSTANCES,
    MAX_PREFERRED_BATCH_SIZES,
    MAX_QUEUE_DELAY_US,
    MAX_QUEUE_SIZE,
    MAX_WARMUP_COUNT,
    MAX_WARMUPS,
)
from onnxgate.core.serving.model_files import MAX_LABEL_BYTES
from onnxgate.core.urls import redact_url
from sample_log_helpers import Collector

TRANSPORTS = ("http", "grpc")
EXPLICIT = ["--model-control-mode", "explicit", "--load-model", "*"]
TARGET, VICTIM, SCALE = "scaled", "victim", 3.0  # the victim's answers are X * 3, the target's X * 1
OUTSIDE_MODEL_FILE = "default_model_filename must name a file inside the model's version directory"
OUTSIDE_WARMUP = "input_data_file must name a file inside the model's warmup directory"
OUTSIDE_LABELS = "label_filename must name a file inside the model directory"
LOAD_TIMEOUT_S = 60.0  # a load that hung (a FIFO read) fails the test on the client's timeout


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sandbox")
    repo = root / "repo"
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())  # right size for a warm-up of x
    (outside / "labels.txt").write_text("a\nb\nc\nd\n")
    modelzoo.build_scaled(repo, VICTIM, scale=SCALE)
    target = modelzoo.build_scaled(repo, TARGET, scale=1.0)
    version_dir = target / "1"
    (version_dir / "evil.onnx").symlink_to(repo / VICTIM / "1" / "model.onnx")
    (version_dir / "up.onnx").symlink_to(Path("..") / ".." / VICTIM / "1" / "model.onnx")  # relative, still out
    os.mkfifo(version_dir / "fifo.onnx")
    warmup = target / "warmup"
    warmup.mkdir()
    (warmup / "good.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (warmup / "big.bin").write_bytes(np.arange(5, dtype=np.float32).tobytes())
    (warmup / "short.bin").write_bytes(np.arange(2, dtype=np.float32).tobytes())
    os.mkfifo(warmup / "fifo")
    (warmup / "to_secret").symlink_to(outside / "secret.bin")
    (warmup / "to_nothing").symlink_to(outside / "nothing.bin")
    (warmup / "dir_out").symlink_to(outside, target_is_directory=True)
    (target / "labels.txt").write_text("alpha\nbeta\ngamma\ndelta\n")
    (target / "big_labels.txt").write_bytes(b"x\n" * (MAX_LABEL_BYTES // 2 + 1))
    (target / "labels_out.txt").symlink_to(outside / "labels.txt")
    # A config.pbtxt on disk goes through the same rule as an override.
    ondisk = modelzoo.build_scaled(repo, "ondisk", scale=5.0)
    modelzoo.write_config(ondisk, f'default_model_filename: "{repo / VICTIM / "1" / "model.onnx"}"\n')
    return repo


@pytest.fixture(scope="module")
def gw(repo: Path):
    with GatewayProcess(repo, EXPLICIT) as g:
        yield g


def load(gw: GatewayProcess, transport: str, config: dict | None, model: str = TARGET) -> str | None:
    """Load ``model`` with ``config`` as the override: None when it loaded, else the refusal's message
    (asserted to be 400 / INVALID_ARGUMENT)."""
    text = json.dumps(config) if config is not None else None
    if transport == "http":
        params = {"config": text} if text is not None else {}
        status, body = sh.http_post(gw, f"/v2/repository/models/{model}/load", {"parameters": params},
                                    timeout=LOAD_TIMEOUT_S)
        if status == 200:
            return None
        assert status == 400, (status, body)
        return body["error"]
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    try:
        client.load_model(model, config=text, client_timeout=LOAD_TIMEOUT_S)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc
        return exc.message()
    finally:
        client.close()
    return None


def answer(gw: GatewayProcess, model: str) -> np.ndarray:
    client = httpclient.InferenceServerClient(gw.http_url)
    inp = httpclient.InferInput("x", list(sh.X.shape), "FP32")
    inp.set_data_from_numpy(sh.X)
    return client.infer(model, [inp]).as_numpy("y")


def still_serving(gw: GatewayProcess) -> None:
    """The target answers with its own file and the other model with its own."""
    np.testing.assert_array_equal(answer(gw, TARGET), sh.X)
    np.testing.assert_array_equal(answer(gw, VICTIM), sh.X * SCALE)


def refused(gw: GatewayProcess, transport: str, config: dict, needle: str) -> str:
    message = load(gw, transport, config)
    assert message is not None, f"the load of {config} was accepted"
    assert needle in message, message
    still_serving(gw)
    return message


def warmup(file: str, name: str = "w", **extra) -> dict:
    inputs = {"x": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": file}}
    return {"model_warmup": [{"name": name, "batch_size": 1, "inputs": inputs, **extra}]}


def labels(file: str) -> dict:
    return {"output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4], "label_filename": file}]}


# -- default_model_filename -------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_absolute_model_file_of_another_model_is_refused(gw, repo, transport):
    other = str(repo / VICTIM / "1" / "model.onnx")
    absent = str(repo / VICTIM / "1" / "absent.onnx")
    message = refused(gw, transport, {"default_model_filename": other}, OUTSIDE_MODEL_FILE)
    assert other not in message and VICTIM not in message
    assert refused(gw, transport, {"default_model_filename": absent}, OUTSIDE_MODEL_FILE) == message, \
        "the refusal tells whether the outside file exists"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dotdot_model_file_is_refused(gw, transport):
    refused(gw, transport, {"default_model_filename": f"../../{VICTIM}/1/model.onnx"}, OUTSIDE_MODEL_FILE)
    refused(gw, transport, {"default_model_filename": "sub/../model.onnx"}, OUTSIDE_MODEL_FILE)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("link", ["evil.onnx", "up.onnx"])
def test_symlink_out_of_the_version_directory_is_refused(gw, transport, link):
    refused(gw, transport, {"default_model_filename": link}, OUTSIDE_MODEL_FILE)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fifo_model_file_is_refused(gw, transport):
    refused(gw, transport, {"default_model_filename": "fifo.onnx"}, "fifo.onnx is not a regular file")


def test_config_on_disk_goes_through_the_same_rule(gw):
    (state, reason), = sh.states(gw, "ondisk").values()
    assert state == "UNAVAILABLE" and OUTSIDE_MODEL_FILE in reason, reason
    still_serving(gw)


# -- warm-up data files -----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fifo_warmup_file_is_refused_without_hanging(gw, transport):
    refused(gw, transport, warmup("fifo"), "fifo is not a regular file")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_warmup_file_outside_gets_one_message_whether_it_exists_or_not(gw, transport):
    messages = {
        file: refused(gw, transport, warmup(file), OUTSIDE_WARMUP)
        for file in ("../../outside/secret.bin", "../../outside/nothing.bin", "to_secret", "to_nothing",
                     "dir_out/secret.bin", "dir_out/nothing.bin", "/etc/hostname", "/nonexistent/file")
    }
    assert len(set(messages.values())) == 1, messages
    assert "secret" not in next(iter(messages.values()))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_warmup_file_must_hold_exactly_what_its_input_needs(gw, transport):
    refused(gw, transport, warmup("big.bin"), "big.bin has 20 bytes, more than the 16 allowed")
    refused(gw, transport, warmup("short.bin"), "expected 16 bytes")
    refused(gw, transport, warmup("absent.bin"), "missing absent.bin")
    assert load(gw, transport, warmup("good.bin")) is None, "a warm-up file inside <model>/warmup loads"
    still_serving(gw)


# -- label files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_label_files_are_contained_and_bounded(gw, transport):
    refused(gw, transport, labels("big_labels.txt"), f"more than the {MAX_LABEL_BYTES} allowed")
    outside = {f: refused(gw, transport, labels(f), OUTSIDE_LABELS) for f in ("labels_out.txt", "../labels.txt")}
    assert len(set(outside.values())) == 1, outside
    assert load(gw, transport, labels("labels.txt")) is None
    client = httpclient.InferenceServerClient(gw.http_url)
    inp = httpclient.InferInput("x", list(sh.X.shape), "FP32")
    inp.set_data_from_numpy(sh.X)
    top = client.infer(TARGET, [inp], outputs=[httpclient.InferRequestedOutput("y", class_count=2)]).as_numpy("y")
    assert [v.decode() for v in top.reshape(-1)] == ["4.000000:3:delta", "3.000000:2:gamma"]


# -- what a config may ask for ----------------------------------------------------------------------
ZERO_X = {"x": {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}}
LIMITS = {
    "instances": ({"instance_group": [{"count": 1_000_000, "kind": "KIND_CPU"}]}, f"1..{MAX_INSTANCES}"),
    "instance_groups": ({"instance_group": [{"count": 1, "kind": "KIND_CPU"}] * (MAX_INSTANCES + 1)},
                        f"1..{MAX_INSTANCES}"),
    "warmup_count": ({"model_warmup": [{"name": "w", "batch_size": 1, "count": 4_000_000_000, "inputs": ZERO_X}]},
                     f"limit of {MAX_WARMUP_COUNT} runs"),
    "warmups": ({"model_warmup": [{"name": f"w{i}", "batch_size": 1, "inputs": ZERO_X}
                                  for i in range(MAX_WARMUPS + 1)]}, f"at most {MAX_WARMUPS}"),
    "warmup_bytes": ({"model_warmup": [{"name": "w", "batch_size": 1, "inputs": {
        "x": {"data_type": "TYPE_FP32", "dims": [1 << 40], "zero_data": True}}}]}, "warm-up limit"),
    "queue_size": ({"dynamic_batching": {"default_queue_policy": {"max_queue_size": 4_000_000_000}}},
                   f"limit of {MAX_QUEUE_SIZE} requests"),
    "queue_delay": ({"dynamic_batching": {"max_queue_delay_microseconds": str(10**15)}},
                    f"limit of {MAX_QUEUE_DELAY_US}"),
    "preferred_sizes": ({"dynamic_batching": {"preferred_batch_size": list(range(1, 1000))}},
                        f"at most {MAX_PREFERRED_BATCH_SIZES}"),
    "preferred_over_max": ({"max_batch_size": 8, "dynamic_batching": {"preferred_batch_size": [4, 16]}},
                           "exceeds max_batch_size 8"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(LIMITS))
def test_unbounded_asks_are_refused_naming_the_limit(gw, transport, case):
    config, needle = LIMITS[case]
    refused(gw, transport, config, needle)


# -- URLs in the log --------------------------------------------------------------------------------
def test_collector_url_credentials_stay_out_of_the_log(tmp_path):
    repo = tmp_path / "repo"
    modelzoo.build_scaled(repo, VICTIM, scale=SCALE)
    port = _dead_port()
    url = f"http://user:secret@127.0.0.1:{port}/path?token=abc"
    config = tmp_path / "gateway.yaml"
    config.write_text("sample_log:\n  default: {rate: 1.0}\n"
                      f"  sink: {{type: http, url: '{url}', batch_size: 1, timeout_s: 2, retries: 0}}\n")
    with GatewayProcess(repo, ["--config", str(config), "--drain-timeout-s", "2"]) as gw:
        np.testing.assert_array_equal(answer(gw, VICTIM), sh.X * SCALE)
        shown = f"collector http://127.0.0.1:{port}/path unreachable"
        assert wait_until(lambda: shown in gw.log, timeout=30), gw.log[-3000:]
        gw.stop()
    assert "secret" not in gw.log and "abc" not in gw.log, gw.log[-3000:]


def test_userinfo_goes_as_basic_credentials_not_in_the_request_line():
    with Collector() as collector:
        host = collector.url.removeprefix("http://")
        assert post(f"http://us%40er:pa:ss@{host}?q=1", b"{}", "application/json", 10.0) == 200
    headers, _ = collector.posts[0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"us@er:pa:ss").decode()


def test_drift_webhook_url_is_logged_redacted(caplog):
    rng = np.random.default_rng(0)
    reference = FeatureTable({"x": rng.normal(0.0, 1.0, 2000)}, {"x": "input"}, 2000, "m")
    hook = f"http://user:secret@127.0.0.1:{_dead_port()}/hook?token=abc#frag"
    live = LiveDrift("m", reference, metrics=DriftMetrics(CollectorRegistry()), window=500, min_rows=100,
                     webhook=hook)
    live.observe({"x": rng.normal(5.0, 1.0, 500)})  # far off the reference: an alert to announce
    with caplog.at_level(logging.WARNING, logger="onnxgate.drift"):
        live.compute()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert redact_url(hook) in logged, logged
    assert "secret" not in logged and "abc" not in logged and "frag" not in logged, logged
