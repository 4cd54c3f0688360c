"""The checked-in protobuf stubs are fresh and wire-compatible with Triton.

* ``test_checked_in_stubs_are_up_to_date`` regenerates the stubs into a temp
  dir with ``proto/generate.py`` and compares them byte for byte with
  ``client/onnxgate_client/pb/``.
* The other tests check that our messages interoperate with the stubs shipped
  in ``tritonclient`` (which are generated from Triton's own .proto files).
"""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as _descriptor
from tritonclient.grpc import model_config_pb2 as tc_model_config_pb2
from tritonclient.grpc import service_pb2 as tc_service_pb2

from onnxgate_client.pb import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "proto" / "generate.py"
PB_DIR = REPO_ROOT / "client" / "onnxgate_client" / "pb"

GENERATED_FILES = [
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
    "model_config_pb2.py",
    "model_config_pb2.pyi",
]

# The RPCs we must declare with Triton's exact names (see proto/grpc_service.proto).
REQUIRED_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
}


# ---------------------------------------------------------------------------
# Staleness
# ---------------------------------------------------------------------------


def test_checked_in_stubs_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "pb"
    # Run from an unrelated cwd: the script must resolve paths from the repo root.
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(out)],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"proto/generate.py failed:\n{result.stdout}\n{result.stderr}"
    generated = sorted(p.name for p in out.iterdir())
    assert generated == GENERATED_FILES

    hint = (
        "is stale: the checked-in protobuf stubs do not match proto/*.proto. "
        "Run `python proto/generate.py` from the repo root and commit the result "
        "(client/onnxgate_client/pb/)."
    )
    stale = []
    for name in generated:
        checked_in = PB_DIR / name
        if not checked_in.is_file():
            stale.append(f"client/onnxgate_client/pb/{name} is missing")
        elif checked_in.read_bytes() != (out / name).read_bytes():
            stale.append(f"client/onnxgate_client/pb/{name}")
    assert not stale, "\n".join(f"{s} {hint}" for s in stale)


# ---------------------------------------------------------------------------
# Descriptor-level compatibility with Triton's protos
# ---------------------------------------------------------------------------


def _real_oneof(field: _descriptor.FieldDescriptor) -> str | None:
    """Name of the field's oneof, ignoring proto3 ``optional`` synthetic oneofs."""
    oneof = field.containing_oneof
    if oneof is None or (len(oneof.fields) == 1 and oneof.name == f"_{field.name}"):
        return None
    return oneof.name


def _assert_message_compatible(
    ours: _descriptor.Descriptor,
    theirs: _descriptor.Descriptor,
    *,
    require_all_fields: bool,
) -> None:
    """Every field of ``ours`` exists in ``theirs`` with the same number/type."""
    assert ours.full_name == theirs.full_name
    their_fields = {f.name: f for f in theirs.fields}
    for field in ours.fields:
        where = f"{ours.full_name}.{field.name}"
        assert field.name in their_fields, f"{where} does not exist in Triton's proto"
        other = their_fields[field.name]
        assert field.number == other.number, f"{where}: field number differs"
        assert field.type == other.type, f"{where}: type differs"
        assert field.is_repeated == other.is_repeated, f"{where}: label differs"
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name, where
        if field.enum_type is not None:
            assert field.enum_type.full_name == other.enum_type.full_name, where
            theirs_values = {v.name: v.number for v in other.enum_type.values}
            for value in field.enum_type.values:
                assert theirs_values.get(value.name) == value.number, f"{where}: enum value {value.name}"
        assert _real_oneof(field) == _real_oneof(other), f"{where}: oneof differs"
    if require_all_fields:
        missing = set(their_fields) - {f.name for f in ours.fields}
        assert not missing, f"{ours.full_name} lacks Triton fields {sorted(missing)}"
    their_nested = theirs.nested_types_by_name
    for nested in ours.nested_types:
        assert nested.name in their_nested, f"{nested.full_name} does not exist upstream"
        _assert_message_compatible(nested, their_nested[nested.name], require_all_fields=require_all_fields)


def test_grpc_service_messages_match_triton_exactly() -> None:
    ours = grpc_service_pb2.DESCRIPTOR
    theirs = tc_service_pb2.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    assert set(ours.message_types_by_name) == set(theirs.message_types_by_name)
    for name, desc in ours.message_types_by_name.items():
        _assert_message_compatible(desc, theirs.message_types_by_name[name], require_all_fields=True)


def test_model_config_is_a_compatible_subset_of_triton() -> None:
    ours = model_config_pb2.DESCRIPTOR
    theirs = tc_model_config_pb2.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    for name, desc in ours.message_types_by_name.items():
        assert name in theirs.message_types_by_name, f"{name} does not exist upstream"
        _assert_message_compatible(desc, theirs.message_types_by_name[name], require_all_fields=False)
    our_types = {v.name: v.number for v in ours.enum_types_by_name["DataType"].values}
    their_types = {v.name: v.number for v in theirs.enum_types_by_name["DataType"].values}
    assert our_types == their_types
    assert our_types["TYPE_BF16"] == 14


def test_max_batch_size_has_explicit_presence() -> None:
    config = model_config_pb2.ModelConfig(name="m")
    assert not config.HasField("max_batch_size")
    config.max_batch_size = 0
    assert config.HasField("max_batch_size")
    # Still the plain int32 field 4 on the wire.
    theirs = tc_model_config_pb2.ModelConfig.FromString(config.SerializeToString())
    assert theirs.max_batch_size == 0
    back = model_config_pb2.ModelConfig.FromString(
        tc_model_config_pb2.ModelConfig(max_batch_size=8).SerializeToString()
    )
    assert back.HasField("max_batch_size") and back.max_batch_size == 8


def test_service_descriptor_matches_triton() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = tc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    our_methods = {m.name: m for m in ours.methods}
    their_methods = {m.name: m for m in theirs.methods}
    assert set(their_methods) >= REQUIRED_RPCS, "tritonclient no longer has some RPCs"
    assert set(their_methods) & REQUIRED_RPCS <= set(our_methods)
    for name in REQUIRED_RPCS:
        mine, other = our_methods[name], their_methods[name]
        assert mine.input_type.full_name == other.input_type.full_name, name
        assert mine.output_type.full_name == other.output_type.full_name, name
        assert mine.client_streaming == other.client_streaming, name
        assert mine.server_streaming == other.server_streaming, name


def test_stubs_use_a_private_descriptor_pool() -> None:
    # Both sets of stubs are imported in this process (tritonclient's own
    # grpc_service.proto/model_config.proto live in the default pool).
    from google.protobuf import descriptor_pool

    assert grpc_service_pb2.DESCRIPTOR.pool is model_config_pb2.DESCRIPTOR.pool
    assert grpc_service_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert tc_service_pb2.DESCRIPTOR.pool is descriptor_pool.Default()


# ---------------------------------------------------------------------------
# Wire round trips
# ---------------------------------------------------------------------------


def test_infer_request_from_tritonclient_parses_with_ours() -> None:
    req = tc_service_pb2.ModelInferRequest(model_name="resnet", model_version="2", id="req-1")
    req.parameters["sequence_id"].int64_param = 42
    req.parameters["tag"].string_param = "hello"
    req.parameters["sequence_start"].bool_param = True
    req.parameters["priority"].uint64_param = 2**63 + 5
    req.parameters["scale"].double_param = 0.5
    tensor = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    tensor.parameters["shared_memory_region"].string_param = "r0"
    req.inputs.add(name="INPUT1", datatype="BYTES", shape=[1])
    raw0 = np.arange(6, dtype="<f4").tobytes()
    raw1 = b"\x02\x00\x00\x00ab"
    req.raw_input_contents.extend([raw0, raw1])
    out = req.outputs.add(name="OUTPUT0")
    out.parameters["classification"].int64_param = 3
    req.outputs.add(name="OUTPUT1")

    ours = grpc_service_pb2.ModelInferRequest.FromString(req.SerializeToString())

    assert ours.model_name == "resnet"
    assert ours.model_version == "2"
    assert ours.id == "req-1"
    assert ours.parameters["sequence_id"].WhichOneof("parameter_choice") == "int64_param"
    assert ours.parameters["sequence_id"].int64_param == 42
    assert ours.parameters["tag"].string_param == "hello"
    assert ours.parameters["sequence_start"].WhichOneof("parameter_choice") == "bool_param"
    assert ours.parameters["sequence_start"].bool_param is True
    assert ours.parameters["priority"].uint64_param == 2**63 + 5
    assert ours.parameters["scale"].double_param == 0.5
    assert [(t.name, t.datatype, list(t.shape)) for t in ours.inputs] == [
        ("INPUT0", "FP32", [2, 3]),
        ("INPUT1", "BYTES", [1]),
    ]
    assert ours.inputs[0].parameters["shared_memory_region"].string_param == "r0"
    assert list(ours.raw_input_contents) == [raw0, raw1]
    assert [o.name for o in ours.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    # Nothing was dropped as an unknown field, and we re-encode identically.
    assert ours.SerializeToString(deterministic=True) == req.SerializeToString(deterministic=True)


def test_infer_response_from_ours_parses_with_tritonclient() -> None:
    resp = grpc_service_pb2.ModelInferResponse(model_name="resnet", model_version="1", id="req-1")
    resp.parameters["triton_final_response"].bool_param = True
    resp.parameters["count"].int64_param = -7
    resp.parameters["note"].string_param = "ok"
    resp.outputs.add(name="OUTPUT0", datatype="INT64", shape=[2, 2])
    resp.outputs.add(name="EMPTY", datatype="FP32", shape=[0])
    raw0 = np.array([[1, 2], [3, 4]], dtype="<i8").tobytes()
    resp.raw_output_contents.extend([raw0, b""])

    theirs = tc_service_pb2.ModelInferResponse.FromString(resp.SerializeToString())

    assert (theirs.model_name, theirs.model_version, theirs.id) == (
        "resnet",
        "1",
        "req-1",
    )
    assert theirs.parameters["triton_final_response"].bool_param is True
    assert theirs.parameters["count"].int64_param == -7
    assert theirs.parameters["note"].string_param == "ok"
    assert [(o.name, o.datatype, list(o.shape)) for o in theirs.outputs] == [
        ("OUTPUT0", "INT64", [2, 2]),
        ("EMPTY", "FP32", [0]),
    ]
    assert list(theirs.raw_output_contents) == [raw0, b""]

    stream = grpc_service_pb2.ModelStreamInferResponse(error_message="", infer_response=resp)
    theirs_stream = tc_service_pb2.ModelStreamInferResponse.FromString(stream.SerializeToString())
    assert theirs_stream.infer_response == theirs


def test_model_config_from_ours_parses_with_tritonclient() -> None:
    cfg = model_config_pb2.ModelConfig(
        name="resnet",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=8,
        default_model_filename="model.onnx",
    )
    cfg.version_policy.specific.versions.extend([1, 3])
    inp = cfg.input.add(name="INPUT0", data_type=model_config_pb2.TYPE_FP32, dims=[3, -1, 224])
    inp.format = model_config_pb2.ModelInput.FORMAT_NCHW
    inp.optional = True
    cfg.output.add(
        name="OUTPUT0",
        data_type=model_config_pb2.TYPE_BF16,
        dims=[1000],
        label_filename="labels.txt",
    )
    cfg.dynamic_batching.preferred_batch_size.extend([4, 8])
    cfg.dynamic_batching.max_queue_delay_microseconds = 100
    cfg.dynamic_batching.default_queue_policy.max_queue_size = 16
    cfg.instance_group.add(name="cpu", kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=2)
    cfg.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=1, gpus=[0, 1])
    cfg.parameters["intra_op_thread_count"].string_value = "4"
    cfg.optimization.execution_accelerators.cpu_execution_accelerator.add(name="openvino")
    cfg.optimization.graph.level = 1
    cfg.model_transaction_policy.decoupled = True
    cfg.response_cache.enable = True

    wrapped = grpc_service_pb2.ModelConfigResponse(config=cfg)
    theirs = tc_service_pb2.ModelConfigResponse.FromString(wrapped.SerializeToString()).config
    assert isinstance(theirs, tc_model_config_pb2.ModelConfig)

    assert theirs.name == "resnet"
    assert theirs.platform == "onnxruntime_onnx"
    assert theirs.backend == "onnxruntime"
    assert theirs.max_batch_size == 8
    assert theirs.default_model_filename == "model.onnx"
    assert theirs.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(theirs.version_policy.specific.versions) == [1, 3]
    assert theirs.input[0].name == "INPUT0"
    assert theirs.input[0].data_type == tc_model_config_pb2.TYPE_FP32
    assert list(theirs.input[0].dims) == [3, -1, 224]
    assert theirs.input[0].format == tc_model_config_pb2.ModelInput.FORMAT_NCHW
    assert theirs.input[0].optional is True
    assert theirs.output[0].data_type == tc_model_config_pb2.TYPE_BF16
    assert list(theirs.output[0].dims) == [1000]
    assert theirs.output[0].label_filename == "labels.txt"
    assert theirs.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(theirs.dynamic_batching.preferred_batch_size) == [4, 8]
    assert theirs.dynamic_batching.max_queue_delay_microseconds == 100
    assert theirs.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert [(g.name, g.kind, g.count, list(g.gpus)) for g in theirs.instance_group] == [
        ("cpu", tc_model_config_pb2.ModelInstanceGroup.KIND_CPU, 2, []),
        ("", tc_model_config_pb2.ModelInstanceGroup.KIND_GPU, 1, [0, 1]),
    ]
    assert theirs.parameters["intra_op_thread_count"].string_value == "4"
    accel = theirs.optimization.execution_accelerators.cpu_execution_accelerator
    assert [a.name for a in accel] == ["openvino"]
    assert theirs.optimization.graph.level == 1
    assert theirs.model_transaction_policy.decoupled is True
    assert theirs.response_cache.enable is True


# ---------------------------------------------------------------------------
# The generated service stubs work with tritonclient end to end
# ---------------------------------------------------------------------------


class _EchoServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return grpc_service_pb2.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):
        resp = grpc_service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            resp.outputs.add(
                name=tensor.name.replace("IN", "OUT"),
                datatype=tensor.datatype,
                shape=tensor.shape,
            )
            resp.raw_output_contents.append(raw)
        return resp


@pytest.fixture
def echo_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_tritonclient_talks_to_our_generated_service(echo_server: str) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=echo_server)
    try:
        assert client.is_server_live(client_timeout=10)
        data = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = grpcclient.InferInput("IN0", [2, 3], "FP32")
        inp.set_data_from_numpy(data)
        result = client.infer("echo", [inp], request_id="r-7", client_timeout=10)
        np.testing.assert_array_equal(result.as_numpy("OUT0"), data)
        assert result.get_response().id == "r-7"
    finally:
        client.close()
