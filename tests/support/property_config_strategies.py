"""Hypothesis strategies for the config parsers (``test_properties.py``): YAML documents shaped like
gateway.yaml with every value and key type YAML can carry, raw YAML text the dumper never writes,
and config.pbtxt fragments."""

from __future__ import annotations

from hypothesis import strategies as st

from onnxgate.config import ServerConfig
from property_strategies import TEXT

SERVER_KEYS = st.sampled_from([f.name for f in ServerConfig.__dataclass_fields__.values()])
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT,
    st.sampled_from([0, 1, -1, 65536, 2_000_001, 1.5, "none", "poll", "explicit", "info", "*", "a:1", "http://x"]),
)
# YAML mapping keys can be any scalar, not only strings.
YAML_KEYS = TEXT | st.integers(-3, 3) | st.none() | st.booleans() | st.dates() | st.floats()


def _nest(kids):
    return st.lists(kids, max_size=3) | st.dictionaries(YAML_KEYS, kids, max_size=3)


YAML_VALUES = st.recursive(YAML_SCALARS | st.dates() | st.binary(max_size=4), _nest, max_leaves=8)
TARGETS = st.sampled_from(["a", "a:1", "a:0", "a:b:c", "", "a:01", "a:²"])
SPLIT_DOCS = st.fixed_dictionaries({}, optional={"target": TARGETS | YAML_VALUES, "weight": YAML_VALUES})
ROUTE_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["r", "", "a/b"]) | YAML_VALUES,
        "split": st.lists(SPLIT_DOCS, max_size=3) | YAML_VALUES,
        "sticky": st.sampled_from(["header:x", "header:", "cookie:x"]) | YAML_VALUES,
        "shadow": st.fixed_dictionaries({}, optional={"target": TARGETS, "fraction": YAML_VALUES,
                                                      "max_in_flight": YAML_VALUES}) | YAML_VALUES,
    },
)
SINK_DOCS = st.fixed_dictionaries(
    {"type": st.sampled_from(["jsonl", "parquet", "http", "none", "kafka"]) | YAML_VALUES},
    optional={k: YAML_VALUES for k in ("path", "url", "rotate_mb", "batch_size", "retries", "backoff_s", "source")},
)
SAMPLE_LOG_DOCS = st.fixed_dictionaries(
    {"sink": SINK_DOCS},
    optional={
        "default": st.fixed_dictionaries({"rate": YAML_VALUES}) | YAML_VALUES,
        "models": st.dictionaries(TEXT, st.fixed_dictionaries({"rate": YAML_VALUES}) | YAML_VALUES, max_size=2),
        "include": st.lists(st.sampled_from(["inputs", "outputs", "shadow", "x"])) | YAML_VALUES,
        "headers": st.lists(TEXT) | YAML_VALUES,
        "sample_by": st.sampled_from(["random", "header:x", "header:", "x"]) | YAML_VALUES,
        "queue_size": YAML_VALUES,
        "queue_max_mb": YAML_VALUES,
        "max_tensor_elements": YAML_VALUES,
        "hash_salt": YAML_VALUES,
    },
)
CONFIG_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "server": st.dictionaries(SERVER_KEYS, YAML_VALUES, max_size=4) | YAML_VALUES,
        "routes": st.lists(ROUTE_DOCS, max_size=2) | YAML_VALUES,
        "sample_log": SAMPLE_LOG_DOCS | YAML_VALUES,
        "drift": st.fixed_dictionaries({}, optional={"models": st.dictionaries(TEXT, YAML_VALUES, max_size=2),
                                                     "interval_s": YAML_VALUES, "webhook": YAML_VALUES}) | YAML_VALUES,
        "registry": st.fixed_dictionaries({}, optional={"mlflow": YAML_VALUES, "settle_s": YAML_VALUES,
                                                        "marker": YAML_VALUES}) | YAML_VALUES,
    },
)
# Raw YAML lines: what the dumper never writes (tags, anchors, timestamps, special floats, flow
# collections cut short, tabs, non-string keys).
YAML_FRAGMENTS = st.sampled_from([
    "server:", "  http_port: ", "  log_level: ", "routes:", "- name: r", "  split: a", "sample_log:", "drift:",
    "registry:", "1: x", "~: x", "[a]: 1", "? a", "2001-13-45", "2001-01-01", ".nan", ".inf", "-.inf", "0x1F",
    "0o17", "1e3", "1_000", "!!binary aGk=", "!!str 5", "!!int x", "!!float x", "&a [1]", "*a", "*b", "[1, 2",
    "{a: b}", '"\\ud800"', "!!python/object:os.system x", "- ", "\t", "---", "...", "%YAML 1.1", "'", '"', "|",
    ">", "#", ": ", "yes", "Null", "=", "<<: *a", "!!set {a}", "!!omap [a: 1]", "!!timestamp 2001-13-45",
])
# Lines that parse more often than fragments do: "key: value" at some indent, the value one of
# the odd scalars or flow collections.
YAML_LINE_KEYS = st.sampled_from(["server", "routes", "sample_log", "drift", "registry", "x", "1", "~", "yes",
                                  "2001-01-01", "http_port", "sink", "models", "name", "split"])
YAML_LINE_VALUES = st.sampled_from([
    "2001-13-45", "2001-02-30 25:61:61", "2001-01-01", ".nan", "-.inf", "0x1F", "1e3", "!!binary aGk=", "*a", "",
    "&a [*a]", "{1: a, b: c}", "[{1: a, b: c}]", "{http_port: 2001-13-45}", "{drain_timeout_s: .nan}", "[1, 2",
    "{type: none}", "[" * 40, "!!int x", "!!float 1e999", "9" * 30, "{? [a]: b}", "|", "!!set {a, b}",
]) | TEXT
YAML_LINES = st.tuples(st.sampled_from(["", "  ", "- ", "  - "]), YAML_LINE_KEYS, YAML_LINE_VALUES).map(
    lambda t: f"{t[0]}{t[1]}: {t[2]}"
)
YAML_TEXTS = st.lists(YAML_LINES | YAML_FRAGMENTS | TEXT, max_size=10).map("\n".join) | st.text(max_size=80)


PBTXT_FRAGMENTS = st.sampled_from([
    "name: 'm'", "max_batch_size: 8", "max_batch_size: -1", "max_batch_size: 99999999999999999999",
    "input { name: 'x' data_type: TYPE_FP32 dims: [ 16 ] }", "input [ { name: 'x' } ]", "dims: [ -1 ]",
    "output { name: 'y' }", "dynamic_batching { }", "instance_group [ { count: 2 kind: KIND_CPU } ]",
    "version_policy: { all { } }", "parameters { key: 'a' value: { string_value: 'b' } }", "{", "}", "[", "]",
    ":", "'", '"', "\\", "#", "\\377", "data_type: TYPE_NOPE", "platform: 'x'", "\x00",
])
