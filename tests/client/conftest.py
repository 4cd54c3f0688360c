"""Fixtures the client tests share: a small model repository, two gateways serving it, a dead port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import modelzoo
from gateway import GatewayProcess


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("client_zoo")
    modelzoo.build_mlp(repo)
    modelzoo.build_string(repo)
    modelzoo.build_mixed_dtypes(repo)
    modelzoo.build_fp16(repo)
    return repo


@pytest.fixture(scope="module")
def pair(repo: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateways serving the same repository."""
    with GatewayProcess(repo) as a, GatewayProcess(repo) as b:
        yield a, b


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
