"""Property-based tests (hypothesis) of the config parsers: ``onnxgate.config.load`` on arbitrary
YAML documents and text, ``parse_routes``, ``SampleLogConfig.from_dict``, ``read_pbtxt`` and
``model_config.parse_json``. Any input gives a result or a :class:`GatewayError` (ConfigError is
one), never another exception.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from onnxgate import config as gateway_config
from onnxgate.core.monitoring.config import SampleLogConfig
from onnxgate.core.serving import model_config
from onnxgate.core.traffic import routes as router
from property_config_strategies import (
    CONFIG_DOCS,
    PBTXT_FRAGMENTS,
    ROUTE_DOCS,
    SAMPLE_LOG_DOCS,
    YAML_TEXTS,
    YAML_VALUES,
)
from property_strategies import ANY_TEXT, json_values, result_or_gateway_error, settings_


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props_config") / "gateway.yaml"


def test_config_load_any_document(config_file):
    @given(CONFIG_DOCS | YAML_VALUES)
    @settings_(200)
    def check(doc):
        config_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
        result_or_gateway_error(gateway_config.load, config_file)

    check()


def test_config_load_any_text(config_file):
    @given(YAML_TEXTS | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
    @settings_(400)
    def check(text):
        config_file.write_text(text, encoding="utf-8")
        result_or_gateway_error(gateway_config.load, config_file)

    check()


_ONE = [{"target": "a", "weight": 1}]


@given(st.lists(ROUTE_DOCS, max_size=3) | YAML_VALUES | json_values())
@example([{"name": "r\ud800", "split": "a"}])  # YAML's "\ud800" escape: not Unicode text
@example([{"name": "r", "split": "a", "sticky": "header:x\udc00"}])
@example([{"name": "r", "split": [{"target": "a", "weight": 10**30}]}])  # a YAML int past 64 bits
@example([{"name": "r", "split": _ONE, "shadow": {"target": "b", "max_in_flight": 10**30}}])
@example([{"name": "r", "split": _ONE, "rollout": {"candidate": "b", "min_comparisons": 10**30}}])
@example([{"name": "r", "split": _ONE, "sticky": "header:a b"}])  # not a header name
@settings_(200)
def test_parse_routes_any_document(doc):
    routes = result_or_gateway_error(router.parse_routes, doc)
    for route in routes or ():
        # to_dict is what GET /v2/routes shows and the workers' shared table holds
        assert router.parse_route(orjson.loads(orjson.dumps(route.to_dict()))) == route


@given(SAMPLE_LOG_DOCS | YAML_VALUES)
@settings_(150)
def test_sample_log_config_any_document(doc):
    result_or_gateway_error(SampleLogConfig.from_dict, doc)




@pytest.fixture(scope="module")
def pbtxt_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props_pbtxt") / "config.pbtxt"


def test_read_pbtxt_any_text(pbtxt_file):
    @given(st.lists(PBTXT_FRAGMENTS | st.text(max_size=10), max_size=10).map(" ".join) | st.binary(max_size=80))
    @settings_(300)
    def check(text):
        if isinstance(text, bytes):
            pbtxt_file.write_bytes(text)
        else:
            pbtxt_file.write_text(text, encoding="utf-8", errors="surrogatepass")
        result_or_gateway_error(model_config.read_pbtxt, pbtxt_file)

    check()


@given(json_values(keys=st.sampled_from(["name", "max_batch_size", "input", "dims", "data_type", "parameters",
                                         "string_value", "version_policy", "specific", "versions"]) | ANY_TEXT)
       .map(lambda v: json.dumps(v)) | st.text(max_size=60))
@settings_(300)
def test_model_config_parse_json_any_text(text):
    result_or_gateway_error(model_config.parse_json, text)


_ALIAS_BOMB = "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 11))


@pytest.mark.parametrize(
    "text",
    [
        "1: x",  # ', '.join of an int section name was a TypeError
        "server: {1: x, null: y}",  # the same for the keys of a section
        "x: 2001-13-45",  # PyYAML builds a date and raises ValueError
        "x: !!timestamp 5",  # PyYAML: AttributeError
        b"server: {host: \xff}",  # UnicodeDecodeError is not an OSError
        "[" * 1000,  # PyYAML's composer recurses
        "server: {drain_timeout_s: .nan}",  # NaN passed every '< 0' and '> max' check
        "server: {repository_poll_secs: .nan}",
        "server: {grpc_keepalive_time_s: .nan}",
        "routes: [{1: a, b: c}]",  # sorted() of int and str keys: TypeError (router, registry)
        "registry: {1: a, b: c}",
        "registry: {mlflow: {models: [{1: a, b: c}]}}",
        # JSON cannot show these (GET /v2/routes, the console's summary): orjson raised TypeError, a 500
        'routes: [{name: "r\\ud800", split: a}]',
        'sample_log: {sink: {type: none}}\ndrift: {models: {"a\\ud800": {reference: /x.parquet}}}',
        "sample_log: {sink: {type: none}, queue_size: 100000000000000000000000}",
        "routes: [{name: r, split: a, shadow: {target: b, max_in_flight: 100000000000000000000000}}]",
        _ALIAS_BOMB,  # a kilobyte naming 9**10 leaves: checked once each, not expanded
    ],
    ids=["int-section", "int-server-key", "timestamp", "timestamp-tag", "not-utf8", "deep", "nan-drain", "nan-poll",
         "nan-keepalive", "route-keys", "registry-keys", "registry-model-keys", "surrogate-route", "surrogate-drift",
         "big-int", "big-int-route", "alias-bomb"],
)
def test_config_errors_found_by_the_campaign(config_file, text):
    if isinstance(text, bytes):
        config_file.write_bytes(text)
    else:
        config_file.write_text(text, encoding="utf-8")
    with pytest.raises(gateway_config.ConfigError):
        gateway_config.load(config_file)
