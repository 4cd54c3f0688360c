"""The gRPC front end through tritonclient.grpc: outputs, versions, metadata, config, health,
statistics, classification, ids, and messages over 4 MiB.

Statistics use models of an extra repository (served by a gateway of this module) that no
other test touches, so counts are exact.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import modelzoo
from gateway import GatewayProcess
from protocol_helpers import (
    BIG_ELEMENTS,
    assert_answer_matches,
    assert_classification,
    assert_stats_delta,
    assert_tensor_equal,
    build_extra_repo,
    infer,
    reference,
    stats_entry,
    zoo_feeds,
)


@pytest.fixture(scope="module")
def extra(tmp_path_factory):
    repo = build_extra_repo(tmp_path_factory.mktemp("grpc_extra"))
    with GatewayProcess(repo) as gw:
        gw.repo = repo
        yield gw


@pytest.fixture
def client(gateway):
    c = grpcclient.InferenceServerClient(gateway.grpc_url)
    yield c
    c.close()


# -- outputs and versions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "wanted"),
    [("add_sub", ["OUTPUT1"]), ("mixed_dtypes", ["i32_out", "flag_out"]), ("string", ["upper"])],
)
def test_requested_outputs_subset(gateway, zoo_repo, model, wanted):
    feeds = zoo_feeds(model, rows=2, seed=11)
    answer = infer("grpc", gateway, model, feeds, outputs=wanted)
    assert sorted(answer.outputs) == sorted(wanted)
    expected = reference(zoo_repo, model, feeds)
    for name in wanted:
        assert_tensor_equal(answer.outputs[name], expected[name], name)


def test_unknown_output_is_invalid_argument(gateway):
    with pytest.raises(InferenceServerException) as err:
        infer("grpc", gateway, "add_sub", zoo_feeds("add_sub"), outputs=["OUTPUT9"])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "OUTPUT9" in str(err.value)


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_explicit_version_picks_that_version(gateway, version):
    feeds = zoo_feeds("scaled", rows=3, seed=5)
    answer = infer("grpc", gateway, "scaled", feeds, version=version)
    assert answer.model_version == version
    np.testing.assert_array_equal(answer.outputs["y"], feeds["x"] * np.float32(version))


def test_no_version_picks_the_highest_ready(gateway, zoo_repo):
    feeds = zoo_feeds("scaled", rows=2, seed=6)
    answer = infer("grpc", gateway, "scaled", feeds)
    assert answer.model_version == "3"
    assert_answer_matches(answer, reference(zoo_repo, "scaled", feeds, 3))


@pytest.mark.parametrize(
    ("model", "version", "code"),
    [
        ("scaled", "9", "StatusCode.NOT_FOUND"),
        ("no_such_model", "", "StatusCode.NOT_FOUND"),
        ("broken", "", "StatusCode.UNAVAILABLE"),
    ],
)
def test_infer_errors_map_to_status_codes(gateway, model, version, code):
    with pytest.raises(InferenceServerException) as err:
        infer("grpc", gateway, model, zoo_feeds("scaled"), version=version)
    assert err.value.status() == code, str(err.value)


def test_request_id_is_echoed(gateway):
    assert infer("grpc", gateway, "mlp", zoo_feeds("mlp"), request_id="req-42").id == "req-42"
    assert infer("grpc_aio", gateway, "mlp", zoo_feeds("mlp"), request_id="aio-7").id == "aio-7"
    assert infer("grpc", gateway, "mlp", zoo_feeds("mlp")).id == ""


def test_model_name_with_a_space(extra):
    feeds = zoo_feeds("mlp", rows=2)
    client = grpcclient.InferenceServerClient(extra.grpc_url)
    assert client.is_model_ready("my model")
    assert client.get_model_metadata("my model").name == "my model"
    client.close()
    answer = infer("grpc", extra, "my model", feeds)
    assert answer.model_name == "my model"
    assert_answer_matches(answer, modelzoo.reference_run(extra.repo / "my model" / "1" / "model.onnx", feeds))


def test_grpc_compression(client, gateway, zoo_repo):
    feeds = zoo_feeds("mlp", rows=32)
    item = grpcclient.InferInput("x", [32, 16], "FP32")
    item.set_data_from_numpy(feeds["x"])
    for algorithm in ("gzip", "deflate"):
        result = client.infer("mlp", [item], compression_algorithm=algorithm)
        assert_tensor_equal(result.as_numpy("y"), reference(zoo_repo, "mlp", feeds)["y"], algorithm)


@pytest.mark.parametrize(
    "kwargs", [{"priority": 1}, {"timeout": 10_000_000}, {"parameters": {"s": "x", "i": 3, "f": 1.5, "b": True}}]
)
def test_request_parameters_are_accepted(client, zoo_repo, kwargs):
    feeds = zoo_feeds("mlp", rows=2)
    item = grpcclient.InferInput("x", [2, 16], "FP32")
    item.set_data_from_numpy(feeds["x"])
    result = client.infer("mlp", [item], **kwargs)
    assert_tensor_equal(result.as_numpy("y"), reference(zoo_repo, "mlp", feeds)["y"], "y")


# -- metadata, config, health ---------------------------------------------------------------


def test_model_metadata_batched(client):
    meta = client.get_model_metadata("mlp")
    assert meta.name == "mlp" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 10])]
    as_json = client.get_model_metadata("mlp", as_json=True)
    assert as_json["inputs"][0]["shape"] == ["-1", "16"]  # MessageToJson: int64 as strings


def test_model_metadata_no_batch_has_exact_shapes(client):
    meta = client.get_model_metadata("no_batch")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [3, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [3, 2])]


def test_model_metadata_datatypes_and_versions(client):
    meta = client.get_model_metadata("mixed_dtypes")
    assert {t.name: t.datatype for t in meta.inputs} == {"f32": "FP32", "i64": "INT64", "flag": "BOOL", "u8": "UINT8"}
    assert {t.name: t.datatype for t in meta.outputs} == {
        "f32_out": "FP32",
        "i64_out": "INT64",
        "flag_out": "BOOL",
        "u8_out": "UINT8",
        "f64_out": "FP64",
        "i32_out": "INT32",
    }
    assert all(t.shape[0] == -1 for t in [*meta.inputs, *meta.outputs])
    assert {t.datatype for t in client.get_model_metadata("string").inputs} == {"BYTES"}
    assert sorted(client.get_model_metadata("scaled").versions) == ["1", "2", "3"]
    assert client.get_model_metadata("scaled", model_version="2").name == "scaled"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_model_config(client):
    config = client.get_model_config("mlp").config
    assert config.name == "mlp" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [16])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [10])]
    doc = client.get_model_config("mlp", as_json=True)
    assert set(doc) == {"config"}
    assert doc["config"]["input"][0]["data_type"] == "TYPE_FP32"
    assert int(doc["config"]["max_batch_size"]) == config.max_batch_size
    # Config input/output names must be a subset of the metadata names (perf_analyzer).
    meta = client.get_model_metadata("mlp")
    assert {i.name for i in config.input} <= {t.name for t in meta.inputs}


def test_model_config_no_batch_and_types(client):
    config = client.get_model_config("no_batch").config
    assert config.max_batch_size == 0
    assert [list(i.dims) for i in config.input] == [[3, 4]]
    as_json = client.get_model_config("no_batch", as_json=True)["config"]
    assert int(as_json.get("max_batch_size", 0)) == 0  # proto3 JSON leaves out zero
    string = client.get_model_config("string", as_json=True)["config"]
    assert {i["name"]: i["data_type"] for i in string["input"]} == {"text": "TYPE_STRING"}
    fp16 = client.get_model_config("fp16", as_json=True)["config"]
    assert fp16["output"][0]["data_type"] == "TYPE_FP16"


def test_server_metadata_lists_only_implemented_extensions(client):
    meta = client.get_server_metadata()
    assert meta.name and meta.version
    extensions = set(meta.extensions)
    assert {"classification", "model_configuration", "model_repository", "statistics"} <= extensions
    # Shared memory, sequences, trace and logging answer UNIMPLEMENTED, so they must not be listed.
    assert not extensions & {"system_shared_memory", "cuda_shared_memory", "sequence", "trace", "logging"}
    with pytest.raises(InferenceServerException) as err:
        client.get_system_shared_memory_status()
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"


def test_health(client, gateway):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("scaled", "2")
    assert client.is_model_ready("broken") is False
    for name, version in (("no_such_model", ""), ("scaled", "9")):
        with pytest.raises(InferenceServerException) as err:
            client.is_model_ready(name, version)
        assert err.value.status() == "StatusCode.NOT_FOUND"
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- classification -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 25])
def test_classification(gateway, zoo_repo, k):
    feeds = zoo_feeds("mlp", rows=4, seed=k)
    answer = infer("grpc", gateway, "mlp", feeds, outputs=["y"], class_count=k)
    labels = answer.outputs["y"]
    assert labels.dtype == object  # BYTES
    assert_classification(labels, reference(zoo_repo, "mlp", feeds)["y"], k)


# -- statistics -----------------------------------------------------------------------------


def _stats(client, name="", version=""):
    return client.get_inference_statistics(model_name=name, model_version=version, as_json=True)


def _counted(extra, rows: int, version: str = "", model: str = "counted") -> None:
    infer("grpc", extra, model, zoo_feeds("add_sub" if model == "counted" else "scaled", rows=rows), version=version)


def test_statistics_count_exactly(extra):
    client = grpcclient.InferenceServerClient(extra.grpc_url)
    rows = [1, 2, 3, 2, 5]
    before_model = stats_entry(_stats(client, "counted"), "counted", "1")
    before_version = stats_entry(_stats(client, "counted", "1"), "counted", "1")
    for r in rows:
        _counted(extra, r)
    after_model = stats_entry(_stats(client, "counted"), "counted", "1")
    after_version = stats_entry(_stats(client, "counted", "1"), "counted", "1")
    assert_stats_delta(before_model, after_model, rows)
    assert_stats_delta(before_version, after_version, rows)
    everything = _stats(client)
    assert stats_entry(everything, "counted", "1")["inference_count"] == after_model["inference_count"]
    assert {s["name"] for s in everything["model_stats"]} >= {"counted", "my model", "big"}
    client.close()


def test_statistics_count_failures(extra):
    client = grpcclient.InferenceServerClient(extra.grpc_url)
    before = stats_entry(_stats(client, "counted"), "counted", "1")
    bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("counted", [bad])
    after = stats_entry(_stats(client, "counted"), "counted", "1")
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert after["inference_stats"]["success"] == before["inference_stats"]["success"]
    assert after["execution_count"] == before["execution_count"]
    client.close()


def test_statistics_per_version(extra):
    client = grpcclient.InferenceServerClient(extra.grpc_url)
    both = _stats(client, "counted_scaled")
    assert sorted(s["version"] for s in both["model_stats"]) == ["1", "2"]
    before = {v: stats_entry(both, "counted_scaled", v) for v in ("1", "2")}
    _counted(extra, 4, "1", "counted_scaled")
    _counted(extra, 1, "2", "counted_scaled")
    _counted(extra, 2, "", "counted_scaled")  # the highest: 2
    one = _stats(client, "counted_scaled", "1")
    assert [s["version"] for s in one["model_stats"]] == ["1"]
    assert_stats_delta(before["1"], stats_entry(one, "counted_scaled", "1"), [4])
    two = stats_entry(_stats(client, "counted_scaled", "2"), "counted_scaled", "2")
    assert_stats_delta(before["2"], two, [1, 2])
    with pytest.raises(InferenceServerException) as err:
        _stats(client, "no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_statistics_proto_fields(extra):
    client = grpcclient.InferenceServerClient(extra.grpc_url)
    _counted(extra, 2)
    reply = client.get_inference_statistics("counted")
    doc = json_format.MessageToDict(reply, preserving_proto_field_name=True)
    (entry,) = doc["model_stats"]
    assert entry["version"] == "1" and int(entry["inference_count"]) >= 2
    assert {int(b["batch_size"]) for b in entry["batch_stats"]} >= {2}
    client.close()


# -- messages over 4 MiB --------------------------------------------------------------------


def test_message_over_4mib_both_ways(extra):
    x = np.random.RandomState(1).rand(4, BIG_ELEMENTS).astype(np.float32)  # 16 MiB each way
    client = grpcclient.InferenceServerClient(extra.grpc_url)
    item = grpcclient.InferInput("x", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    result = client.infer("big", [item])
    assert_tensor_equal(result.as_numpy("y"), x, "y")
    client.close()


def test_message_over_4mib_aio(extra):
    x = np.random.RandomState(2).rand(5, BIG_ELEMENTS).astype(np.float32)

    async def run():
        client = grpcaio.InferenceServerClient(extra.grpc_url)
        try:
            item = grpcclient.InferInput("x", list(x.shape), "FP32")
            item.set_data_from_numpy(x)
            return (await client.infer("big", [item])).as_numpy("y")
        finally:
            await client.close()

    assert_tensor_equal(asyncio.run(run()), x, "y")
