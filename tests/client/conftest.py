"""Fixtures the client tests share: a small model repository, two gateways serving it, a dead port,
and a gateway that wants tokens (``secured``)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import auth_helpers
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


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    """Fresh tokens: ``infer``, ``read``, ``admin`` (each that scope alone) and ``ops`` (all three)."""
    return auth_helpers.make_tokens()


@pytest.fixture(scope="module")
def secured(
    repo: Path, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway started with a ``security:`` config holding the digests of ``tokens``; explicit
    model control (everything loaded at start) so that load and unload can be called."""
    config = auth_helpers.write_security_config(tmp_path_factory.mktemp("secured"), tokens)
    args = ["--config", str(config), "--model-control-mode", "explicit", "--load-model", "*"]
    with GatewayProcess(repo, args) as gw:
        yield gw
