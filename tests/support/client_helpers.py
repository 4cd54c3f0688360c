"""Plain helpers the client test modules share."""

from __future__ import annotations

from gateway import GatewayProcess


def url(gw: GatewayProcess, kind: str) -> str:
    return f"grpc://{gw.grpc_url}" if kind == "grpc" else f"http://{gw.http_url}"
