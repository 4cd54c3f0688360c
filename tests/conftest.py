"""Shared fixtures: a model repository built from real ONNX graphs, and a gateway serving it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))  # gateway, modelzoo and the helpers
sys.path.insert(1, str(Path(__file__).parent.parent))  # the repository root, for loadtests

import modelzoo
from gateway import GatewayProcess


@pytest.fixture(scope="session")
def zoo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one model per feature the protocol tests need."""
    repo = tmp_path_factory.mktemp("zoo")
    modelzoo.build_mlp(repo)
    modelzoo.build_add_sub(repo)
    modelzoo.build_mixed_dtypes(repo)
    modelzoo.build_fp16(repo)
    modelzoo.build_string(repo)
    modelzoo.build_no_batch(repo)
    modelzoo.build_int_types(repo)
    for version, scale in ((1, 1.0), (2, 2.0), (3, 3.0)):
        modelzoo.build_scaled(repo, version=version, scale=scale)
    modelzoo.write_config(repo / "scaled", 'version_policy: { all { } }\n')
    modelzoo.corrupt_model(repo, "broken")
    return repo


@pytest.fixture(scope="session")
def gateway(zoo_repo: Path):
    """One gateway process serving ``zoo_repo`` for the whole session."""
    with GatewayProcess(zoo_repo) as gw:
        yield gw
