"""Unit tests of ``onnxgate.core.serving.model_config``: completing config.pbtxt from real ONNX graphs.

The graphs come from :mod:`modelzoo` (plus two small ones built here) and are read through
real ONNX Runtime sessions, exactly as the gateway reads them.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper

import modelzoo
from onnxgate.core.serving import model_config
from onnxgate.core.serving.model_config import GraphTensor
from onnxgate.errors import ModelLoadError
from onnxgate.frontends import http_codec
from onnxgate_client.pb import model_config_pb2 as mc

DEFAULT_MBS = 32


def _build_reduce(repo: Path) -> Path:
    """``x`` float32 [batch, 4] -> ``total`` = sum of everything, a scalar (no batch dimension)."""
    return modelzoo._save(
        repo, "reduce", 1,
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )


def _build_half_fixed(repo: Path) -> Path:
    """``a`` float32 [batch, 4] + ``b`` float32 [4] (fixed first dim) -> ``c`` [batch, 4]."""
    return modelzoo._save(
        repo, "half_fixed", 1,
        [helper.make_node("Add", ["a", "b"], ["c"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4])],
    )


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, tuple[list[GraphTensor], list[GraphTensor]]]:
    """Model name -> (graph inputs, graph outputs) as ONNX Runtime reports them."""
    repo = tmp_path_factory.mktemp("mc_zoo")
    builders = [modelzoo.build_mlp, modelzoo.build_add_sub, modelzoo.build_no_batch, modelzoo.build_string,
                modelzoo.build_mixed_dtypes, modelzoo.build_fp16, _build_reduce, _build_half_fixed]
    out = {}
    for build in builders:
        model_dir = build(repo)
        sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        out[model_dir.name] = (
            [GraphTensor(i.name, i.type, tuple(i.shape)) for i in sess.get_inputs()],
            [GraphTensor(o.name, o.type, tuple(o.shape)) for o in sess.get_outputs()],
        )
    return out


def complete(graphs, name: str, pbtxt: str = "") -> mc.ModelConfig:
    inputs, outputs = graphs[name]
    return model_config.complete(model_config.parse_pbtxt(pbtxt), name, inputs, outputs, DEFAULT_MBS)


def tensors(entries) -> dict[str, tuple[str, list[int]]]:
    return {e.name: (mc.DataType.Name(e.data_type), list(e.dims)) for e in entries}


# -- no config: everything from the graph ---------------------------------------------------------


def test_graph_tensor_dims_make_symbolic_dims_minus_one():
    assert GraphTensor("x", "tensor(float)", ("batch", 4, None, 7)).dims == (-1, 4, -1, 7)


def test_no_config_batchable_model_gets_default_max_batch_size(graphs):
    cfg = complete(graphs, "mlp")
    assert cfg.name == "mlp" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == DEFAULT_MBS
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [16])}
    assert tensors(cfg.output) == {"y": ("TYPE_FP32", [10])}
    assert orjson.loads(http_codec.config_json(cfg))["max_batch_size"] == DEFAULT_MBS


def test_no_config_fixed_first_dim_gets_zero_and_full_dims(graphs):
    cfg = complete(graphs, "no_batch")
    assert cfg.max_batch_size == 0
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [3, 4])}
    assert tensors(cfg.output) == {"y": ("TYPE_FP32", [3, 2])}
    assert orjson.loads(http_codec.config_json(cfg))["max_batch_size"] == 0  # present, perf_analyzer reads it


@pytest.mark.parametrize(
    ("name", "inputs", "outputs"),
    [
        ("reduce", {"x": ("TYPE_FP32", [-1, 4])}, {"total": ("TYPE_FP32", [])}),
        ("half_fixed", {"a": ("TYPE_FP32", [-1, 4]), "b": ("TYPE_FP32", [4])}, {"c": ("TYPE_FP32", [-1, 4])}),
    ],
)
def test_no_config_not_every_tensor_dynamic_first_gets_zero(graphs, name, inputs, outputs):
    cfg = complete(graphs, name)
    assert cfg.max_batch_size == 0
    assert tensors(cfg.input) == inputs
    assert tensors(cfg.output) == outputs


def test_no_config_datatypes_from_graph(graphs):
    cfg = complete(graphs, "mixed_dtypes")
    assert tensors(cfg.input) == {
        "f32": ("TYPE_FP32", [4]), "i64": ("TYPE_INT64", [2]), "flag": ("TYPE_BOOL", [1]), "u8": ("TYPE_UINT8", [3])
    }
    assert {n: t for n, (t, _) in tensors(cfg.output).items()} == {
        "f32_out": "TYPE_FP32", "i64_out": "TYPE_INT64", "flag_out": "TYPE_BOOL", "u8_out": "TYPE_UINT8",
        "f64_out": "TYPE_FP64", "i32_out": "TYPE_INT32",
    }
    assert tensors(complete(graphs, "string").input) == {"text": ("TYPE_STRING", [1])}
    assert tensors(complete(graphs, "fp16").output) == {"y": ("TYPE_FP16", [8])}


def test_defaults_filled_in(graphs):
    cfg = complete(graphs, "mlp")
    assert cfg.backend == "onnxruntime"
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 1
    assert sum(g.count for g in cfg.instance_group) >= 1


# -- partial configs are completed ----------------------------------------------------------------


def test_only_max_batch_size(graphs):
    cfg = complete(graphs, "mlp", "max_batch_size: 4")
    assert cfg.max_batch_size == 4
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [16])}
    assert tensors(cfg.output) == {"y": ("TYPE_FP32", [10])}


def test_explicit_zero_on_batchable_model_keeps_batch_dim_in_dims(graphs):
    cfg = complete(graphs, "mlp", "max_batch_size: 0")
    assert cfg.max_batch_size == 0
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [-1, 16])}
    assert tensors(cfg.output) == {"y": ("TYPE_FP32", [-1, 10])}


def test_only_some_inputs_listed(graphs):
    cfg = complete(graphs, "add_sub", 'max_batch_size: 8\ninput [{ name: "INPUT1" data_type: TYPE_FP32 dims: [16] }]')
    assert tensors(cfg.input) == {"INPUT0": ("TYPE_FP32", [16]), "INPUT1": ("TYPE_FP32", [16])}
    assert tensors(cfg.output) == {"OUTPUT0": ("TYPE_FP32", [16]), "OUTPUT1": ("TYPE_FP32", [16])}


def test_input_listed_by_name_only_is_filled(graphs):
    cfg = complete(graphs, "mlp", 'input [{ name: "x" }]\noutput [{ name: "y" }]')
    assert cfg.max_batch_size == DEFAULT_MBS
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [16])}
    assert tensors(cfg.output) == {"y": ("TYPE_FP32", [10])}


def test_config_minus_one_takes_the_graph_dim(graphs):
    cfg = complete(graphs, "no_batch", 'input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] }]')
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [3, 4])}


def test_config_may_fix_a_dim_the_graph_leaves_dynamic(graphs):
    cfg = complete(graphs, "reduce", 'max_batch_size: 0\ninput [{ name: "x" data_type: TYPE_FP32 dims: [5, 4] }]')
    assert tensors(cfg.input) == {"x": ("TYPE_FP32", [5, 4])}


def test_given_version_policy_is_kept(graphs):
    cfg = complete(graphs, "mlp", "version_policy: { specific { versions: [1, 3] } }")
    assert list(cfg.version_policy.specific.versions) == [1, 3]


def test_completion_does_not_modify_the_parsed_config(graphs):
    parsed = model_config.parse_pbtxt("max_batch_size: 4")
    inputs, outputs = graphs["mlp"]
    model_config.complete(parsed, "mlp", inputs, outputs, DEFAULT_MBS)
    assert not parsed.input and not parsed.name


# -- config that disagrees with the graph ---------------------------------------------------------

DISAGREE = {
    "wrong_data_type": ("mlp", 'input [{ name: "x" data_type: TYPE_INT32 dims: [16] }]',
                        ["'x'", "TYPE_INT32", "TYPE_FP32"]),
    "wrong_output_data_type": ("mlp", 'output [{ name: "y" data_type: TYPE_FP64 dims: [10] }]',
                               ["'y'", "TYPE_FP64", "TYPE_FP32"]),
    "wrong_dims": ("mlp", 'input [{ name: "x" data_type: TYPE_FP32 dims: [15] }]', ["'x'", "[15]", "[16]"]),
    "wrong_fixed_dims_no_batch": ("no_batch", 'input [{ name: "x" data_type: TYPE_FP32 dims: [3, 5] }]',
                                  ["'x'", "[3, 5]", "[3, 4]"]),
    "wrong_rank_batch_dim_listed": ("mlp", 'max_batch_size: 8 input [{ name: "x" dims: [-1, 16] }]',
                                    ["'x'", "[-1, 16]", "[16]", "batch dimension"]),
    "wrong_rank": ("no_batch", 'input [{ name: "x" dims: [12] }]', ["'x'", "[12]", "[3, 4]"]),
    "unknown_input": ("mlp", 'input [{ name: "nope" data_type: TYPE_FP32 dims: [16] }]', ["'nope'", "['x']"]),
    "unknown_output": ("mlp", 'output [{ name: "z" }]', ["'z'", "['y']"]),
    "duplicate_input": ("mlp", 'input [{ name: "x" }, { name: "x" }]', ["'x'", "twice"]),
    "batching_fixed_first_dim": ("no_batch", "max_batch_size: 4", ["max_batch_size 4", "'x'", "[3, 4]"]),
    "batching_scalar_output": ("reduce", "max_batch_size: 2", ["max_batch_size 2", "'total'"]),
    "negative_max_batch_size": ("mlp", "max_batch_size: -1", ["max_batch_size", "-1"]),
    "name_mismatch": ("mlp", 'name: "other"', ["'other'", "'mlp'"]),
    "other_platform": ("mlp", 'platform: "tensorflow_savedmodel"', ["tensorflow_savedmodel", "onnxruntime_onnx"]),
}


@pytest.mark.parametrize("case", sorted(DISAGREE))
def test_config_disagreeing_with_graph_is_a_load_error(graphs, case):
    name, pbtxt, needles = DISAGREE[case]
    with pytest.raises(ModelLoadError) as info:
        complete(graphs, name, pbtxt)
    for needle in needles:
        assert needle in info.value.message, f"{info.value.message!r} does not mention {needle!r}"


# -- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [("max_batch_size: 'four'", "max_batch_size"), ("this is { not pbtxt", "config.pbtxt"),
     ('input [{ name: "x" data_type: TYPE_FLOAT32 }]', "TYPE_FLOAT32"), ("no_such_field: 1", "no_such_field")],
)
def test_unparseable_pbtxt(text, needle):
    with pytest.raises(ModelLoadError) as info:
        model_config.parse_pbtxt(text)
    assert needle in info.value.message and "config.pbtxt" in info.value.message


def test_read_pbtxt_errors_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"cannot read config\.pbtxt"):
        model_config.read_pbtxt(tmp_path / "config.pbtxt")
    (tmp_path / "config.pbtxt").write_bytes(b'name: "caf\xe9"\n')  # latin-1, not UTF-8
    with pytest.raises(ModelLoadError, match="UTF-8"):
        model_config.read_pbtxt(tmp_path / "config.pbtxt")
    (tmp_path / "config.pbtxt").write_text("max_batch_size: 3\n")
    assert model_config.read_pbtxt(tmp_path / "config.pbtxt").max_batch_size == 3


def test_parse_json_override():
    cfg = model_config.parse_json('{"max_batch_size": 2, "input": [{"name": "x", "data_type": "TYPE_FP32"}]}')
    assert cfg.max_batch_size == 2 and cfg.input[0].data_type == mc.TYPE_FP32
    with pytest.raises(ModelLoadError):
        model_config.parse_json('{"max_batch_size": "lots"}')


# -- version policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pbtxt", "available", "served"),
    [
        ("", [1, 2, 3], [3]),
        ("version_policy: { latest { num_versions: 2 } }", [3, 1, 2], [3, 2]),
        ("version_policy: { latest { num_versions: 5 } }", [1, 2], [2, 1]),
        ("version_policy: { specific { versions: [1, 3] } }", [1, 2, 3], [3, 1]),
        ("version_policy: { specific { versions: [4] } }", [1, 2, 3], []),
        ("version_policy: { all { } }", [2, 10, 1], [10, 2, 1]),
    ],
)
def test_select_versions(pbtxt, available, served):
    assert model_config.select_versions(model_config.parse_pbtxt(pbtxt), available) == served


def test_tensor_specs_and_metadata_shape(graphs):
    cfg = complete(graphs, "mixed_dtypes")
    specs = {s.name: s for s in model_config.tensor_specs(cfg.input)}
    assert specs["i64"].dtype.v2 == "INT64" and specs["i64"].dims == (2,)
    assert specs["flag"].shape(batched=True) == [-1, 1] and specs["flag"].shape(batched=False) == [1]


# -- priority levels, queue policies and the default deadline --------------------------------------

BAD_SCHEDULING = {
    "default_level_out_of_range": ("dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
                                   ["default_priority_level", "1..2", "3"]),
    "default_level_missing": ("dynamic_batching { priority_levels: 2 }", ["default_priority_level", "0"]),
    "policy_for_unknown_level": (
        "dynamic_batching { priority_levels: 2 default_priority_level: 1 "
        "priority_queue_policy { key: 5 value: { max_queue_size: 4 } } }", ["level 5", "priority_levels is 2"]),
    "too_many_levels": ("dynamic_batching { priority_levels: 1000 default_priority_level: 1 }", ["1000"]),
    "level_queue_too_large": (
        "dynamic_batching { priority_levels: 1 default_priority_level: 1 "
        "priority_queue_policy { key: 1 value: { max_queue_size: 100000000 } } }",
        ["priority_queue_policy[1]", "100000000"]),
    "deadline_not_a_number": ('parameters { key: "default_deadline_ms" value: { string_value: "soon" } }',
                              ["soon"]),
    "deadline_negative": ('parameters { key: "default_deadline_ms" value: { string_value: "-1" } }',
                          ["default_deadline_ms", "-1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEDULING))
def test_bad_priority_or_deadline_config_is_a_load_error(case):
    pbtxt, needles = BAD_SCHEDULING[case]
    with pytest.raises(ModelLoadError) as info:
        model_config.check_limits(model_config.parse_pbtxt("max_batch_size: 8\n" + pbtxt))
    for needle in needles:
        assert needle in info.value.message, f"{info.value.message!r} does not mention {needle!r}"


def test_priority_levels_and_queue_policies_become_the_batch_policy():
    from onnxgate.core.serving.batch_policy import policy_from_config

    config = model_config.parse_pbtxt(
        "max_batch_size: 8\n"
        'parameters { key: "default_deadline_ms" value: { string_value: "12.5" } }\n'
        "dynamic_batching { priority_levels: 3 default_priority_level: 2\n"
        "  default_queue_policy { max_queue_size: 50 default_timeout_microseconds: 700 }\n"
        "  priority_queue_policy { key: 1 value: { max_queue_size: 5 timeout_action: DELAY "
        "default_timeout_microseconds: 100 allow_timeout_override: true } } }\n"
    )
    model_config.check_limits(config)
    p = policy_from_config(config)
    assert (p.priority_levels, p.default_priority_level, p.shadow_level, p.max_queue_size) == (3, 2, 4, 50)
    assert p.default_deadline_ns == 12_500_000
    assert p.levels[1].max_queue_size == 5 and p.levels[1].delay_on_timeout
    assert p.levels[2].max_queue_size == 0 and p.levels[2].default_timeout_ns == 700_000  # the default policy
    assert [p.level(v) for v in (None, 0, 1, 2, 3, 4, 2**64 - 1)] == [2, 2, 1, 2, 3, 2, 2]
    assert p.timeout_ns(1, 50) == 50_000 and p.timeout_ns(1, 500) == 100_000  # may only shorten it
    assert p.timeout_ns(2, 50) == 700_000  # the default policy does not allow an override
    assert policy_from_config(config, scheduler="fifo").deadline_aware is False
