"""Deployment artifacts, checked without Docker or a cluster.

The Dockerfile is parsed (stages, user, ports, entrypoint, health check, build context), its
health check command runs against a real gateway, the Kubernetes manifests are validated
offline against the JSON schemas bundled in ``kubernetes-validate``, the KServe ServingRuntime
(a CRD, no bundled schema) gets a structural check, and every ``onnxgate serve`` flag used
anywhere must exist. The client builds as its own distribution without ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30"
UID = 10001


# -- Dockerfile -----------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@cache
def dockerfile() -> list[tuple[str, str]]:
    return _instructions((ROOT / "Dockerfile").read_text())


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in dockerfile():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _final(keyword: str) -> list[str]:
    return [args for k, args in _stages()[-1] if k == keyword]


def test_dockerfile_is_multi_stage_from_python_slim():
    froms = [args for k, args in dockerfile() if k == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith("AS builder"), froms
    global_args = dict(a.split("=", 1) for k, a in dockerfile()[: dockerfile().index(("FROM", froms[0]))] if k == "ARG")
    assert global_args["BASE_IMAGE"] == "python:3.11-slim"
    assert froms[-1].startswith("${BASE_IMAGE}")
    copies = _final("COPY")
    assert any(c.startswith("--from=builder /opt/venv") for c in copies), copies
    assert all(c.startswith("--from=") for c in copies), "the runtime stage takes only the built venv"


def test_dockerfile_variant_argument_selects_onnxruntime_gpu():
    builder = " ".join(args for k, args in _stages()[0])
    assert ("ARG", "VARIANT=cpu") in _stages()[0]
    assert '"${wheel}[gpu]"' in builder and "onnxruntime-gpu" in builder
    assert '"$VARIANT" = "gpu"' in builder


def test_dockerfile_runs_as_non_root_and_exposes_the_ports():
    users = _final("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1] == f"{UID}:{UID}"
    assert sorted(int(p) for e in _final("EXPOSE") for p in e.split()) == [8000, 8001, 8002]


def test_dockerfile_entrypoint_and_cmd():
    assert json.loads(_final("ENTRYPOINT")[-1]) == ["onnxgate", "serve"]
    cmd = json.loads(_final("CMD")[-1])
    assert cmd == ["--model-repository", "/models", "--host", "0.0.0.0"]
    assert_known_flags(cmd)


def _healthcheck_command() -> list[str]:
    (check,) = _final("HEALTHCHECK")
    _, _, cmd = check.partition(" CMD ")
    return json.loads(cmd)


def test_dockerfile_healthcheck_asks_readiness_with_urllib():
    cmd = _healthcheck_command()
    assert cmd[:2] == ["python", "-c"] and "urllib" in cmd[2] and "/v2/health/ready" in cmd[2]
    with GatewayProcess() as gw:  # the bundled demo repository
        probe = cmd[2].replace("127.0.0.1:8000", gw.http_url)
        assert subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    probe = cmd[2].replace("127.0.0.1:8000", f"127.0.0.1:{closed}")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode != 0


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern(pattern: str) -> re.Pattern[str]:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + "$")


def excluded(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent directory counts."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in _dockerignore():
        negate = raw.startswith("!")
        pattern = _pattern(raw.lstrip("!").strip("/"))
        if any(pattern.match(p) for p in prefixes):
            result = not negate
    return result


def test_every_copy_source_exists_in_the_build_context():
    sources = []
    for keyword, args in dockerfile():
        if keyword in ("COPY", "ADD") and "--from=" not in args:
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
        assert not excluded(src), f"COPY source {src} is excluded by .dockerignore"
    assert not excluded("server/onnxgate/cli.py") and not excluded("client/onnxgate_client/pb/grpc_service_pb2.py")
    assert excluded("tests/deploy/test_deploy.py") and excluded("server/onnxgate/__pycache__/cli.cpython-311.pyc")
    assert excluded(".git/HEAD") and excluded(".venv/bin/python")


def _build_wheel(source: Path, out: Path) -> Path:
    code = "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _context_copy(dest: Path) -> Path:
    """The files a docker build would see: the repository minus .dockerignore."""
    reincluded = [p[1:].strip("/") for p in _dockerignore() if p.startswith("!")]
    for top, dirs, files in os.walk(ROOT):
        base = Path(top).relative_to(ROOT).as_posix()
        base = "" if base == "." else base + "/"
        # skip excluded directories that no "!pattern" reaches into (.git, .venv, ...)
        dirs[:] = [d for d in dirs if not excluded(base + d) or any(r.startswith(base + d) for r in reincluded)]
        for name in files:
            if not excluded(base + name):
                (dest / base).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(top) / name, dest / base / name)
    return dest


def test_the_build_context_builds_the_wheel(tmp_path):
    context = _context_copy(tmp_path / "context")
    wheel = _build_wheel(context, tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "onnxgate/cli.py" in names and "onnxgate_client/_client.py" in names
    assert any(n.startswith("onnxgate/demo/models/") and n.endswith("model.onnx") for n in names)


def test_client_builds_as_its_own_distribution_without_onnxruntime(tmp_path):
    source = tmp_path / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    wheel = _build_wheel(source, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Name: onnxgate-client" in metadata
    requires = [
        line.split(":", 1)[1].strip().lower() for line in metadata.splitlines() if line.startswith("Requires-Dist")
    ]
    assert {re.split(r"[<>=!~ ;\[]", r)[0] for r in requires} == {"numpy", "grpcio", "protobuf", "httpx"}
    assert "onnxgate_client/py.typed" in names and "onnxgate_client/pb/grpc_service_pb2_grpc.py" in names
    assert not any(n.startswith("onnxgate/") for n in names)


# -- Kubernetes -----------------------------------------------------------------------------


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def manifests() -> dict[str, dict]:
    """``kind/name`` -> document, for the core manifests (not the KServe CRD)."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f)}


def test_core_manifests_validate_against_the_kubernetes_schemas_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    kinds = set()
    for key, doc in manifests().items():
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, key
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= kinds
    broken = json.loads(json.dumps(manifests()["Deployment/onnxgate"]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _container() -> dict:
    return manifests()["Deployment/onnxgate"]["spec"]["template"]["spec"]["containers"][0]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_deployment_probes_drain_and_resources():
    pod = manifests()["Deployment/onnxgate"]["spec"]["template"]["spec"]
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert ports[c["readinessProbe"]["httpGet"]["port"]] == 8000
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    args = c["args"]
    assert_known_flags(args)
    drain = int(command[1]) + float(_flag(args, "--drain-delay-s")) + float(_flag(args, "--drain-timeout-s"))
    assert pod["terminationGracePeriodSeconds"] > drain
    threads = int(_flag(args, "--cpu-threads"))
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"] == str(threads)
    assert _flag(args, "--model-repository") == "/models" and _flag(args, "--host") == "0.0.0.0"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in manifests()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == UID


def test_service_and_autoscaler_point_at_the_deployment():
    deployment = manifests()["Deployment/onnxgate"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = manifests()["Service/onnxgate"]["spec"]
    assert service["selector"].items() <= labels.items()
    ports = {p["port"]: p for p in service["ports"]}
    assert set(ports) == {8000, 8001, 8002}
    assert ports[8001]["appProtocol"] == "kubernetes.io/h2c"
    hpa = manifests()["HorizontalPodAutoscaler/onnxgate"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onnxgate"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_kserve_serving_runtime_structure():
    (runtime,) = _docs(K8S / "kserve" / "servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    spec = runtime["spec"]
    assert any(f["name"] == "onnx" for f in spec["supportedModelFormats"])
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    args = container["args"]
    assert_known_flags(args)
    assert _flag(args, "--model-repository") == "/mnt/models"
    assert int(_flag(args, "--http-port")) == container["ports"][0]["containerPort"]
    # the container part is a core Container: check it against the schema of one
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# -- flags ----------------------------------------------------------------------------------


@cache
def _serve_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "onnxgate", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_known_flags(args: list[str]) -> None:
    for arg in args:
        if arg.startswith("--"):
            assert re.search(rf"{re.escape(arg.split('=')[0])}\b", _serve_help()), f"onnxgate serve has no {arg}"
