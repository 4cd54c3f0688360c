"""Bare echo servers: the transport ceiling the gateway is compared with.

One process, one uvloop loop, like the gateway: a ``grpc.aio`` server answering
``inference.GRPCInferenceService/ModelInfer`` and ``/ModelStreamInfer`` and a uvicorn + httptools
ASGI app answering ``POST .../infer``. Neither runs a model nor decodes tensors: the unary and HTTP
handlers take the request bytes and return a canned reply of exactly the size and shape the gateway
sends for one row of the model (the stream handler parses each request only for its ``id``). The
gRPC server uses the gateway's channel options; uvicorn uses the gateway's settings.

    python -m loadtests.bench.echo_servers --model gemm16 --out-dim 16 --http-port 0 --grpc-port 0

logs ``listening: http H:P, grpc H:P, metrics H:0`` then `` ready: `` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Sequence

import orjson

from loadtests.loadgen.grpc_client import varint


def canned_grpc_reply(model: str, version: str, output: str, out_dim: int, rows: int = 1) -> bytes:
    """The ModelInferResponse the gateway sends for ``rows`` rows (zeros as data)."""
    from onnxgate_client.pb import grpc_service_pb2 as pb

    msg = pb.ModelInferResponse(model_name=model, model_version=version)
    msg.outputs.add(name=output, datatype="FP32", shape=[rows, out_dim])
    msg.raw_output_contents.append(bytes(4 * rows * out_dim))
    return msg.SerializeToString()


def canned_http_reply(model: str, version: str, output: str, out_dim: int, rows: int = 1) -> tuple[bytes, int]:
    """The binary-extension HTTP body the gateway sends for ``rows`` rows; returns (body, JSON length)."""
    raw = bytes(4 * rows * out_dim)
    header = orjson.dumps(
        {
            "model_name": model,
            "model_version": version,
            "outputs": [
                {
                    "name": output,
                    "datatype": "FP32",
                    "shape": [rows, out_dim],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    )
    return header + raw, len(header)


class EchoApp:
    """ASGI: read the whole body, answer 200 with the canned reply."""

    def __init__(self, body: bytes, json_length: int) -> None:
        self.body = body
        self.headers = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(json_length).encode()),
            (b"content-length", str(len(body)).encode()),
        ]

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


async def serve(
    host: str,
    http_port: int,
    grpc_port: int,
    reply: bytes,
    http_body: bytes,
    json_length: int,
    registered: bool = False,
) -> None:
    import grpc
    import uvicorn

    from onnxgate_client.pb import grpc_service_pb2 as pb

    parse_request = pb.ModelInferRequest.FromString

    async def model_infer(request: bytes, context) -> bytes:
        return reply

    async def model_stream_infer(requests, context):
        async for request in requests:
            rid = parse_request(request).id.encode()
            inner = reply + b"\x1a" + varint(len(rid)) + rid if rid else reply
            yield b"\x12" + varint(len(inner)) + inner  # ModelStreamInferResponse.infer_response

    limit = 256 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    if registered:
        # Like the generated add_*_to_server of grpcio-tools >= 1.63 (what the gateway calls): every
        # method of the inference service (20) and of health (2) registered with the core.
        for i in range(len(handlers), 20):
            handlers[f"Unused{i}"] = grpc.unary_unary_rpc_method_handler(model_infer)
        server.add_registered_method_handlers("inference.GRPCInferenceService", handlers)
        health = {n: grpc.unary_unary_rpc_method_handler(model_infer) for n in ("Check", "Watch")}
        server.add_registered_method_handlers("grpc.health.v1.Health", health)
    bound_grpc = server.add_insecure_port(f"{host}:{grpc_port}")
    await server.start()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, http_port))
    sock.listen(2048)
    sock.setblocking(False)
    config = uvicorn.Config(
        EchoApp(http_body, json_length),
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
    )
    http = uvicorn.Server(config)
    http.capture_signals = _no_signals  # type: ignore[method-assign]
    task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    bound_http = sock.getsockname()[1]
    print(f"listening: http {host}:{bound_http}, grpc {host}:{bound_grpc}, metrics {host}:0", file=sys.stderr)
    print(" ready: echo", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.should_exit = True
    await asyncio.gather(task, server.stop(1), return_exceptions=True)


class _NoSignals:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _no_signals() -> _NoSignals:
    return _NoSignals()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.echo_servers", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--model", default="gemm16", help="model name echoed in replies")
    p.add_argument("--model-version", default="1")
    p.add_argument("--output", default="y", help="output name in replies")
    p.add_argument("--out-dim", type=int, default=16, help="FP32 elements per row of the reply")
    p.add_argument(
        "--registered",
        action="store_true",
        help="register 22 methods with the gRPC core like the gateway's generated stubs do (default: generic only)",
    )
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (gateway: uvloop)")
    args = p.parse_args(argv)
    reply = canned_grpc_reply(args.model, args.model_version, args.output, args.out_dim)
    body, json_length = canned_http_reply(args.model, args.model_version, args.output, args.out_dim)
    main_coro = serve(args.host, args.http_port, args.grpc_port, reply, body, json_length, args.registered)
    if args.loop == "asyncio":
        asyncio.run(main_coro)
    else:
        import uvloop

        uvloop.run(main_coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
