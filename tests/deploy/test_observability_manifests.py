"""The autoscaling manifests (deploy/kubernetes/autoscaling) and the KServe runtime, validated offline.

Core kinds (the HPA, the prometheus-adapter ConfigMap) go through the Kubernetes JSON schemas
bundled in kubernetes-validate, as in test_deploy.py. The custom resources (KEDA ScaledObject,
Knative Service, KServe ServingRuntime) go through the openAPIV3Schema of their published CRDs
(tests/deploy/schemas, README there), closed the way the API server's strict field validation
reads them, and, for KEDA and Knative, through the validators the @kubernetes-models npm packages
generate from those CRDs. Each validator is shown to reject a broken manifest. Beyond the
schemas: what the controllers check (Knative's one port, its autoscaling annotations), that the
metrics each autoscaler asks for are ones the prometheus-adapter rules serve, and that the
Knative container is the Deployment's.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
AUTOSCALING = K8S / "autoscaling"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.30"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind_and_name(folder: Path) -> dict[str, dict]:
    """``kind/name`` -> document, for every manifest under ``folder``."""
    out = {}
    for f in sorted(folder.glob("*.yaml")):
        for d in _docs(f):
            out[f"{d['kind']}/{d['metadata']['name']}"] = d
    return out


@cache
def documents() -> dict[str, dict]:
    """Every manifest under autoscaling/, by ``kind/name``."""
    return by_kind_and_name(AUTOSCALING)


def _doc(kind: str, name: str = "onnxgate") -> dict:
    return copy.deepcopy(documents()[f"{kind}/{name}"])


def _deployment() -> dict:
    (d,) = _docs(K8S / "deployment.yaml")
    return d


def _runtime() -> dict:
    (d,) = _docs(K8S / "kserve" / "servingruntime.yaml")
    return d


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


# -- CRD schemas ------------------------------------------------------------------------------


def closed(node: Any) -> Any:
    """A CRD's structural schema as a JSON Schema under strict field validation: objects with
    ``properties`` are closed unless they preserve unknown fields; int-or-string and nullable
    as the API server reads them."""
    if isinstance(node, list):
        return [closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = closed(value)  # a schema or a list of schemas (additionalProperties may be a bool)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields") or out.get("x-kubernetes-embedded-resource")
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(api_version: str, kind: str) -> dict:
    group, version = api_version.split("/")
    vendored = json.loads((SCHEMAS / f"{group}_{version}_{kind}.json").read_text())
    assert vendored["apiVersion"] == api_version and vendored["kind"] == kind
    return closed(vendored["openAPIV3Schema"])


def crd_errors(doc: dict) -> list[str]:
    """Schema errors of a custom resource (metadata as core ObjectMeta), empty when valid."""
    validator = jsonschema.Draft4Validator(crd_schema(doc["apiVersion"], doc["kind"]))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    try:
        kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"metadata: {exc}")
    return errors


CUSTOM = [("ScaledObject", "autoscaling/keda-scaledobject.yaml"), ("Service", "autoscaling/knative-service.yaml"),
          ("ServingRuntime", "kserve/servingruntime.yaml")]


@pytest.mark.parametrize("kind,path", CUSTOM)
def test_custom_resources_validate_against_their_published_crds(kind: str, path: str, monkeypatch):
    _offline(monkeypatch)
    (doc,) = _docs(K8S / path)
    assert doc["kind"] == kind
    assert crd_errors(doc) == []


def _broken_variants() -> list[tuple[str, dict, str]]:
    """(what, manifest, the error it must give) for each CRD kind."""
    out = []
    so = _doc("ScaledObject")
    so["spec"]["minReplicaCnt"] = so["spec"].pop("minReplicaCount")
    out.append(("ScaledObject: misspelled field", so, "minReplicaCnt"))
    so = _doc("ScaledObject")
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 64
    out.append(("ScaledObject: trigger metadata is strings only", so, "is not of type 'string'"))
    ks = _doc("Service")
    ks["spec"]["template"]["spec"]["containerConcurency"] = ks["spec"]["template"]["spec"].pop("containerConcurrency")
    out.append(("Knative Service: misspelled field", ks, "containerConcurency"))
    ks = _doc("Service")
    ks["spec"]["template"]["spec"]["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "1"]}}}
    out.append(("Knative Service: a field Knative does not take", ks, "lifecycle"))
    ks = _doc("Service")
    ks["spec"]["template"]["spec"]["containerConcurrency"] = "32"
    out.append(("Knative Service: wrong type", ks, "is not of type 'integer'"))
    sr = _runtime()
    sr["spec"]["supportedModelFormat"] = sr["spec"].pop("supportedModelFormats")
    out.append(("ServingRuntime: misspelled field", sr, "supportedModelFormat"))
    sr = _runtime()
    sr["spec"]["containers"][0]["ports"][1]["containerPort"] = "9000"
    out.append(("ServingRuntime: wrong type", sr, "is not of type 'integer'"))
    sr = _runtime()
    sr["metadata"]["lables"] = sr["metadata"].pop("labels")
    out.append(("ServingRuntime: misspelled metadata field", sr, "lables"))
    return out


@pytest.mark.parametrize("what,doc,expected", _broken_variants(), ids=[v[0] for v in _broken_variants()])
def test_the_crd_schemas_reject_a_broken_manifest(what: str, doc: dict, expected: str):
    errors = crd_errors(doc)
    assert errors and any(expected in e for e in errors), f"{what}: {errors}"


def test_closing_a_schema_keeps_what_preserves_unknown_fields():
    schema = closed({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"c": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True}}})
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid({"a": {"b": "x"}, "open": {"c": "x", "d": 1}, "map": {"k": "v"}, "port": "http",
                               "maybe": None})
    assert validator.is_valid({"port": 8080})
    assert not validator.is_valid({"a": {"b": "x", "typo": 1}})
    assert not validator.is_valid({"extra": 1})
    assert not validator.is_valid({"port": 1.5})


# -- the @kubernetes-models validators (npm) ----------------------------------------------------------


def _npm_validators() -> Path:
    """The npm packages of tests/deploy/schemas/npm, installed once per lockfile into a cache."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        if os.environ.get("ONNXGATE_REQUIRE_KUBERNETES_MODELS") == "1":
            pytest.fail("node and npm are required (ONNXGATE_REQUIRE_KUBERNETES_MODELS=1)")
        pytest.skip("node/npm not installed")
    source = SCHEMAS / "npm"
    lock = (source / "package-lock.json").read_bytes()
    base = Path(os.environ.get("ONNXGATE_NPM_CACHE", Path.home() / ".cache" / "onnxgate" / "crd-validators"))
    target = base / hashlib.sha256(lock + (source / "package.json").read_bytes()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run installing it: wait, then reuse it
        if not (target / "node_modules" / ".package-lock.json").exists():
            for name in ("package.json", "package-lock.json"):
                shutil.copy(source / name, target / name)
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=target,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"npm ci failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        shutil.copy(source / "validate.js", target / "validate.js")
    return target


def _npm_validate(docs: list[dict]) -> list[str | None]:
    target = _npm_validators()
    done = subprocess.run(["node", "validate.js"], cwd=target, input=json.dumps(docs), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_keda_and_knative_pass_the_kubernetes_models_validators():
    good = [_doc("ScaledObject"), _doc("Service")]
    assert _npm_validate(good) == [None, None]
    so = _doc("ScaledObject")
    del so["spec"]["triggers"][0]["type"]
    ks = _doc("Service")
    ks["spec"]["template"]["spec"]["containerConcurrency"] = "32"
    assert all(_npm_validate([so, ks])), "the validators reject a trigger without type and a string concurrency"


# -- core kinds --------------------------------------------------------------------------------------


def test_core_kinds_validate_against_the_kubernetes_schemas_offline(monkeypatch):
    _offline(monkeypatch)
    core = {k: d for k, d in documents().items() if "." not in d["apiVersion"].split("/")[0]}
    assert set(core) == {"HorizontalPodAutoscaler/onnxgate", "ConfigMap/prometheus-adapter"}
    for key, doc in core.items():
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, key
    broken = _doc("HorizontalPodAutoscaler")
    broken["spec"]["metrics"][0]["pods"]["target"]["averageValu"] = "16"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    # the pod parts of the custom resources are core Containers and Volumes
    ks = _doc("Service")["spec"]["template"]["spec"]
    runtime = _runtime()["spec"]
    for spec in (ks, runtime):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
               "spec": {"containers": spec["containers"], "volumes": spec["volumes"]}}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# -- the autoscalers ask for metrics the adapter serves --------------------------------------


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(_doc("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])["rules"]


def test_prometheus_adapter_rules_are_well_formed():
    rules = _adapter_rules()
    assert rules
    for rule in rules:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}, rule
        series = re.match(r"[a-z_:][a-z0-9_:]*", rule["seriesQuery"]).group()
        assert re.search(rule["name"]["matches"], series), rule["name"]
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"} and overrides["pod"] == {"resource": "pod"}
        for template in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert template in rule["metricsQuery"], (template, rule["metricsQuery"])


def test_the_hpa_replaces_the_cpu_one_and_asks_for_served_metrics():
    hpa = _doc("HorizontalPodAutoscaler")
    (cpu,) = _docs(K8S / "hpa.yaml")
    assert hpa["metadata"]["name"] == cpu["metadata"]["name"], "same name: applying it replaces the CPU HPA"
    assert hpa["spec"]["scaleTargetRef"] == cpu["spec"]["scaleTargetRef"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == _deployment()["metadata"]["name"]
    served = {r["name"]["as"]: set(r["resources"]["overrides"]) for r in _adapter_rules()}
    kinds = set()
    for metric in hpa["spec"]["metrics"]:
        kinds.add(metric["type"])
        if metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            assert "pod" in served[name], name
        else:
            assert metric["type"] == "Object"
            described = metric["object"]["describedObject"]
            services = {d["metadata"]["name"] for d in _docs(K8S / "service.yaml")}
            assert described["kind"] == "Service" and described["name"] in services
            assert described["kind"].lower() in served[metric["object"]["metric"]["name"]]
    assert kinds == {"Pods", "Object"}


def test_keda_scales_the_deployment_on_prometheus_queries():
    so = _doc("ScaledObject")["spec"]
    assert so["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onnxgate"}
    (cpu,) = _docs(K8S / "hpa.yaml")
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (cpu["spec"]["minReplicas"], cpu["spec"]["maxReplicas"])
    queries = []
    for trigger in so["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert re.fullmatch(r"https?://[^/\s]+(:\d+)?", meta["serverAddress"]), meta["serverAddress"]
        assert float(meta["threshold"]) > 0 and meta["query"].startswith("sum(")
        queries.append(meta["query"])
    joined = " ".join(queries)
    for gauge in ("onnxgate_queued_rows", "onnxgate_requests_in_flight", "onnxgate_instance_busy_ratio"):
        assert gauge in joined, gauge


# -- Knative ---------------------------------------------------------------------------------------

KNATIVE_AUTOSCALING = {"class", "metric", "target", "target-utilization-percentage", "min-scale", "max-scale",
                       "initial-scale", "scale-down-delay", "window", "panic-window-percentage",
                       "panic-threshold-percentage", "target-burst-capacity", "activation-scale",
                       "scale-to-zero-pod-retention-period", "metric-aggregation-algorithm"}
# knative/serving pkg/apis/serving/k8s_validation.go reservedPorts: queue-proxy HTTP, HTTP/2, admin,
# autoscaler metrics, user metrics, profiling
KNATIVE_RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}


def test_knative_service_scales_on_concurrency_with_a_hard_limit():
    ks = _doc("Service")["spec"]["template"]
    annotations = ks["metadata"]["annotations"]
    keys = {k.split("/", 1)[1] for k in annotations if k.startswith("autoscaling.knative.dev/")}
    assert keys <= KNATIVE_AUTOSCALING, keys - KNATIVE_AUTOSCALING
    assert annotations["autoscaling.knative.dev/class"] == "kpa.autoscaling.knative.dev"
    assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
    concurrency = ks["spec"]["containerConcurrency"]
    assert isinstance(concurrency, int) and concurrency > 0
    assert 0 < float(annotations["autoscaling.knative.dev/target"]) <= concurrency
    scale = [int(annotations[f"autoscaling.knative.dev/{k}"]) for k in ("min-scale", "initial-scale", "max-scale")]
    assert 1 <= scale[0] <= scale[1] <= scale[2], "never to zero: a new pod loads every model"
    assert "securityContext" not in ks["spec"], "pod securityContext needs a Knative feature flag"


def _probe(probe: dict) -> dict:
    return {k: v for k, v in probe.items() if k != "httpGet"} | {"path": probe["httpGet"]["path"]}


def test_knative_container_is_the_deployments():
    """Knative's webhook takes one container port (named http1 or h2c, probes on it); the rest is
    the Deployment's container: image, args, resources, probes, mounts, and the volumes' sources."""
    ks = _doc("Service")["spec"]["template"]["spec"]
    (c,) = ks["containers"]
    pod = _deployment()["spec"]["template"]["spec"]
    (d,) = pod["containers"]
    (port,) = c["ports"]
    assert port["name"] in ("http1", "h2c") and port.get("protocol", "TCP") == "TCP"
    deployment_ports = {p["name"]: p["containerPort"] for p in d["ports"]}
    assert port["containerPort"] == deployment_ports["http" if port["name"] == "http1" else "grpc"]
    # the queue-proxy shares the pod's network: none of the gateway's listeners may take its ports
    assert not set(deployment_ports.values()) & KNATIVE_RESERVED_PORTS
    for key in ("image", "args", "resources"):
        assert c[key] == d[key], key
    for key in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[key]["httpGet"]["port"] == port["containerPort"], key
        assert _probe(c[key]) == _probe(d[key]), key
    assert c["volumeMounts"] == d["volumeMounts"]
    assert "lifecycle" not in c
    sc = pod["securityContext"] | d["securityContext"]
    for key in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile", "allowPrivilegeEscalation",
                "readOnlyRootFilesystem", "capabilities"):
        assert c["securityContext"][key] == sc[key], key
    volumes = {v["name"]: v for v in ks["volumes"]}
    for v in pod["volumes"]:
        mine = volumes[v["name"]]
        if "secret" in v:
            assert mine["secret"]["secretName"] == v["secret"]["secretName"]
            assert mine["secret"]["defaultMode"] & 0o222 == 0, "nobody may write the tokens file"
            assert mine["secret"]["defaultMode"] & 0o004, "no fsGroup: the gateway's user reads it as other"
        else:
            assert mine == v, v["name"]
    annotations = _doc("Service")["spec"]["template"]["metadata"]["annotations"]
    deployment_annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert {k: annotations[k] for k in deployment_annotations} == deployment_annotations, "scraped as the Deployment"


# -- KServe ----------------------------------------------------------------------------------------


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_serving_runtime_declares_http_and_grpc_ports_the_kserve_way():
    """The first port is HTTP (KServe's predictor Service maps port 80 to it); the gRPC port's
    name carries h2c, which KServe reads as gRPC (appProtocol kubernetes.io/h2c on the Service)."""
    (container,) = _runtime()["spec"]["containers"]
    args = container["args"]
    http, grpc = container["ports"]
    assert http == {"containerPort": int(_flag(args, "--http-port")), "name": "http1", "protocol": "TCP"}
    assert grpc == {"containerPort": int(_flag(args, "--grpc-port")), "name": "h2c", "protocol": "TCP"}
    assert "grpc-v2" in _runtime()["spec"]["protocolVersions"]
