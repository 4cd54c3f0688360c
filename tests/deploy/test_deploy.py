"""Deployment artifacts, checked without Docker or a cluster.

The Dockerfile is parsed (stages, user, ports, entrypoint, health check, build context), its
health check command runs against a real gateway, the Kubernetes manifests are validated
offline against the JSON schemas bundled in ``kubernetes-validate``, the KServe ServingRuntime
(a CRD, no bundled schema) gets a structural check, and every ``onnxgate serve`` flag used
anywhere must exist. Tokens: every gateway container (and the image's default config) reads a
config naming a tokens file that a Secret provides, mounted read-only; the config and the Secret's
file parse as the gateway parses them; no manifest holds a token; probes ask health paths only.
The client builds as its own distribution without ONNX Runtime.
"""

from __future__ import annotations

import hashlib
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


IMAGE_CONFIG = "/etc/onnxgate/gateway.yaml"
TOKENS_FILE = "/etc/onnxgate/tokens/tokens.yaml"


def test_dockerfile_entrypoint_and_cmd():
    assert json.loads(_final("ENTRYPOINT")[-1]) == ["onnxgate", "serve"]
    cmd = json.loads(_final("CMD")[-1])
    assert cmd == ["--config", IMAGE_CONFIG, "--model-repository", "/models", "--host", "0.0.0.0"]
    assert_known_flags(cmd)


def _image_config(tmp_path: Path) -> dict:
    """The config file the runtime stage writes, written here by the same shell command."""
    (run,) = [args for args in _final("RUN") if IMAGE_CONFIG in args]
    command = run[run.index("printf"):]
    assert command.endswith(f"> {IMAGE_CONFIG}"), command
    target = tmp_path / "gateway.yaml"
    done = subprocess.run(["sh", "-c", command.replace(IMAGE_CONFIG, str(target))], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(target.read_text())


def test_dockerfile_default_config_wants_a_tokens_file_and_holds_no_token(tmp_path):
    """The image listens on 0.0.0.0: its default config names the tokens file to mount, and the
    gateway refuses to start while it is missing."""
    doc = _image_config(tmp_path)
    assert doc == {"security": {"tokens_file": TOKENS_FILE}}, doc
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"(?i)bearer\s+\S|ONNXGATE_TOKEN\s*=|[0-9a-f]{64}", text), "no token or digest in the image"
    assert f"{TOKENS_FILE.rsplit('/', 1)[0]}:ro" in text, "the Dockerfile shows the read-only tokens mount"
    from onnxgate.config import load
    from onnxgate.errors import ConfigError

    with pytest.raises(ConfigError, match="tokens_file"):
        load(str(tmp_path / "gateway.yaml"), {})


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


def _core_files() -> list[Path]:
    """The core manifests (not the KServe CRD) and the Secret kept apart in secrets/."""
    return sorted(K8S.glob("*.yaml")) + sorted((K8S / "secrets").glob("*.yaml"))


@cache
def manifests() -> dict[str, dict]:
    """``kind/name`` -> document, for the core manifests and the Secret (not the KServe CRD)."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for f in _core_files() for d in _docs(f)}


def test_core_manifests_validate_against_the_kubernetes_schemas_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    kinds = set()
    for key, doc in manifests().items():
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, key
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "ConfigMap", "Secret"} <= kinds
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
    # the container part is a core Container, the volumes core Volumes: check them against a Pod's schema
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [container], "volumes": spec["volumes"]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# -- tokens ---------------------------------------------------------------------------------

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


def _gateway_pods() -> list[tuple[str, dict]]:
    """(name, pod spec) of everything that runs the gateway: the Deployment and the ServingRuntime."""
    (runtime,) = _docs(K8S / "kserve" / "servingruntime.yaml")
    return [("Deployment/onnxgate", manifests()["Deployment/onnxgate"]["spec"]["template"]["spec"]),
            ("ServingRuntime/onnxgate", runtime["spec"])]


def _mount_of(pod: dict, container: dict, path: str) -> tuple[dict, dict, str]:
    """The volume and mount a file path lies in, and the file's name inside the volume."""
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(root):
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            return volume, mount, path[len(root):]
    raise AssertionError(f"{path} is on no volume of container {container['name']}")


def _secret_files() -> dict[str, str]:
    secret = manifests()["Secret/onnxgate-tokens"]
    assert "data" not in secret, "digests need no base64: keep them readable in stringData"
    return secret["stringData"]


def test_every_gateway_container_takes_its_tokens_from_the_secret_read_only():
    configmap = manifests()["ConfigMap/onnxgate-config"]
    for where, pod in _gateway_pods():
        for c in pod["containers"]:
            args = c["args"]
            assert _flag(args, "--host") == "0.0.0.0", where  # why the tokens are needed
            volume, mount, key = _mount_of(pod, c, _flag(args, "--config"))
            assert volume["configMap"]["name"] == "onnxgate-config" and mount["readOnly"] is True, where
            security = yaml.safe_load(configmap["data"][key])["security"]
            assert "tokens" not in security, "digests belong in the Secret, not the ConfigMap"
            volume, mount, key = _mount_of(pod, c, security["tokens_file"])
            assert volume["secret"]["secretName"] == "onnxgate-tokens", where
            assert mount["readOnly"] is True and "subPath" not in mount, f"{where}: read-only, and updated in place"
            assert key in _secret_files(), where
            assert volume["secret"]["defaultMode"] & 0o222 == 0, f"{where}: nobody may write the tokens file"
    deployment = dict(_gateway_pods())["Deployment/onnxgate"]
    (tokens,) = [v for v in deployment["volumes"] if "secret" in v]
    assert tokens["secret"]["defaultMode"] & 0o007 == 0, "with fsGroup set, the group reads it, others do not"


def test_the_config_and_the_tokens_file_parse_as_the_gateway_parses_them(tmp_path):
    from onnxgate.config import load
    from onnxgate.core.security.config import read_tokens_file

    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(_secret_files()["tokens.yaml"])
    tokens = read_tokens_file(str(tokens_file))  # name, sha256 and scopes only: no room for a token
    assert tokens and all(t.sha256 != EMPTY_DIGEST for t in tokens), "a placeholder no empty token matches"
    assert any("admin" in t.scopes for t in tokens), "an operator token"
    text = manifests()["ConfigMap/onnxgate-config"]["data"]["gateway.yaml"]
    config = tmp_path / "gateway.yaml"
    config.write_text(text.replace(TOKENS_FILE, str(tokens_file)))
    security = load(str(config), {}).security
    assert security.enabled and security.all_tokens() == tokens


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (str(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_no_manifest_holds_a_token():
    docs = [d for f in [*_core_files(), *sorted((K8S / "kserve").glob("*.yaml"))] for d in _docs(f)]
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        for text in _strings(doc):
            assert not re.search(r"(?i)bearer\s+[A-Za-z0-9]", text), f"{where} holds a bearer token"
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec)
        for c in pod.get("containers", []) if isinstance(pod, dict) else []:
            for env in c.get("env", []):
                assert not ("TOKEN" in env["name"].upper() and "value" in env), f"{where}: {env['name']} inline"
    secret_text = _secret_files()["tokens.yaml"]
    digests = re.findall(r"sha256:\s*\"?([0-9a-fA-F]+)", secret_text)
    assert digests and all(len(d) == 64 for d in digests), "the Secret holds digests"


def test_probes_ask_health_paths_only():
    """Health needs no token: a probe elsewhere would need one in the manifest, or fail."""
    for where, pod in _gateway_pods():
        for c in pod["containers"]:
            probes = {k: c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c}
            assert "readinessProbe" in probes, where
            for name, probe in probes.items():
                assert set(probe) & {"exec", "grpc", "tcpSocket"} == set(), f"{where} {name}: HTTP health only"
                assert probe["httpGet"]["path"] in ("/v2/health/live", "/v2/health/ready"), f"{where} {name}"
                assert "httpHeaders" not in probe["httpGet"], f"{where} {name} sends headers"
    check = _healthcheck_command()[2]
    assert "/v2/health/ready" in check and "uthorization" not in check


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
