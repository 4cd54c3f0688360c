"""Command line: argument parsing only; the work happens in ``lifecycle``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from onnxgate import __version__
from onnxgate.config import load
from onnxgate.core.tracing import check_tracing
from onnxgate.errors import ConfigError, GatewayError


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC and HTTP")
    p.add_argument("--config", help="gateway config file (YAML); flags override it")
    p.add_argument(
        "--model-repository",
        help="model repository: a path, or a URL (s3://, gs://, az://, any fsspec URL, mlflow://); "
        "default: the bundled demo repository",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0 = any free port)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 8002)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], help="default info")
    p.add_argument(
        "--drain-delay-s", type=float, help="seconds to keep serving after readiness turns false (default 0)"
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        help="budget of the whole drain after the delay: in-flight requests finish within it, then what is "
        "left is answered 503/UNAVAILABLE and files are closed (default 30)",
    )
    p.add_argument("--tls-cert-file", help="PEM certificate chain: serve HTTP and gRPC over TLS (with --tls-key-file)")
    p.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    p.add_argument(
        "--tls-client-ca-file",
        help="PEM CA bundle: require client certificates it signed (mTLS) on every endpoint but health",
    )
    p.add_argument("--grpc-max-message-bytes", type=int, help="gRPC message size limit (default 256 MiB)")
    p.add_argument("--http-max-body-bytes", type=int, help="HTTP body size limit (default 256 MiB)")
    _limit_arguments(p)
    p.add_argument(
        "--default-max-batch-size",
        type=int,
        help="max_batch_size given to models whose config leaves it out and whose graph can batch (default 256)",
    )
    p.add_argument("--cpu-threads", type=int, help="intra-op threads per ONNX Runtime session (default: all cores)")
    p.add_argument(
        "--scheduler",
        choices=["deadline", "fifo"],
        help="deadline: earliest deadline first with predictive admission (default); fifo: the scheduler off",
    )
    p.add_argument(
        "--model-control-mode",
        choices=["none", "poll", "explicit"],
        help="none: load at start only; poll: follow the repository; explicit: load/unload API (default none)",
    )
    p.add_argument("--workers", type=int, help="gateway processes sharing the ports (default 1)")
    p.add_argument(
        "--listen-after-load",
        action="store_true",
        default=None,
        help="open the ports only once the repository has loaded (for balancers without health checks)",
    )
    p.add_argument("--repository-poll-secs", type=float, help="poll interval in poll mode (default 15)")
    p.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="explicit mode: load this model at start (repeatable; '*' loads all)",
    )


def _limit_arguments(p: argparse.ArgumentParser) -> None:
    """Connection limits (the rest are config-file keys; README "Limits and failure behaviour")."""
    p.add_argument("--http-max-header-bytes", type=int, help="request line + headers limit; beyond: 431 (32768)")
    p.add_argument(
        "--http-header-timeout-s", type=float, help="a request head must arrive within this; else 408 (10; 0 = off)"
    )
    p.add_argument(
        "--http-body-timeout-s", type=float, help="longest pause while a body arrives; else 408 (30; 0 = off)"
    )
    p.add_argument("--http-keep-alive-timeout-s", type=float, help="idle keep-alive connections close after (75)")
    p.add_argument(
        "--http-max-connections", type=int, help="HTTP connections served at once; beyond: 503 (1024; 0 = off)"
    )
    p.add_argument(
        "--grpc-max-concurrent-streams", type=int, help="gRPC calls at once per connection; beyond, clients wait (1000)"
    )
    p.add_argument("--grpc-max-metadata-bytes", type=int, help="gRPC request metadata limit (32768)")
    p.add_argument(
        "--grpc-max-connection-idle-s", type=float, help="close gRPC connections without calls after (300; 0 = off)"
    )
    p.add_argument(
        "--grpc-max-connection-age-s", type=float, help="GOAWAY gRPC connections older than this (300; 0 = off)"
    )


def _admin_options() -> argparse.ArgumentParser:
    """--url, --json, the token file and TLS files of `models` and `routes`: before or after the action.

    No option takes the token itself: a command line shows in ``ps``.
    """
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="the gateway's HTTP address (http://127.0.0.1:8000)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, not a table")
    common.add_argument(
        "--token-file",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="file holding the bearer token (whitespace stripped); default: $ONNXGATE_TOKEN",
    )
    common.add_argument(
        "--ca-file", default=argparse.SUPPRESS, metavar="PATH", help="PEM CA to check an https:// gateway against"
    )
    common.add_argument(
        "--cert-file", default=argparse.SUPPRESS, metavar="PATH", help="PEM client certificate (mTLS), https:// only"
    )
    common.add_argument("--key-file", default=argparse.SUPPRESS, metavar="PATH", help="PEM key of --cert-file")
    return common


class _AdminActions:
    """``models``/``routes`` and their actions, all sharing ``_admin_options`` (so --url etc. work
    before or after the action). No abbreviations: ``--token X`` must not pass for ``--token-file X``."""

    def __init__(self, sub: argparse._SubParsersAction, name: str, help: str) -> None:
        self.common = _admin_options()
        p = sub.add_parser(name, parents=[self.common], allow_abbrev=False, help=help)
        self.actions = p.add_subparsers(dest="action", required=True)

    def add(self, name: str, help: str) -> argparse.ArgumentParser:
        return self.actions.add_parser(name, parents=[self.common], allow_abbrev=False, help=help)


def _models_parser(sub: argparse._SubParsersAction) -> None:
    # --url and --json work before or after the action: `onnxgate models list --json`.
    models = _AdminActions(sub, "models", "list, load, unload or roll back models of a running gateway")
    models.add("list", "the repository index: models, versions, states, reasons")
    load = models.add("load", "load or reload a model; --version pins one version")
    load.add_argument("name")
    load.add_argument("--version", type=int, help="serve exactly this version until the next plain load")
    models.add("unload", "stop serving a model (in-flight requests finish)").add_argument("name")
    models.add("rollback", "pin the version that served before the current one").add_argument("name")


def _routes_parser(sub: argparse._SubParsersAction) -> None:
    routes = _AdminActions(sub, "routes", "list, show, add/replace or delete routes of a running gateway, and rollouts")
    routes.add("list", "every route: split, sticky key, shadow")
    routes.add("get", "one route").add_argument("name")
    put = routes.add("put", "add or replace a route from a YAML or JSON file")
    put.add_argument("name")
    put.add_argument("--file", required=True, metavar="PATH", help="the route (split, sticky, shadow); '-' = stdin")
    delete = routes.add("delete", "delete a route")
    delete.add_argument("name")
    for p in (put, delete):
        p.add_argument("--abort-rollout", action="store_true",
                       help="abort the route's running rollout and make the change (without it: 409)")
    rollout = routes.add("rollout", "show a route's rollout, or pause, resume, promote or abort it")
    rollout.add_argument("name")
    rollout.add_argument("rollout_action", nargs="?", choices=["pause", "resume", "promote", "abort"],
                         metavar="{pause,resume,promote,abort}", help="the action (none: show the rollout)")
    rollout.add_argument("--reason", metavar="TEXT", help="why, recorded in the rollout's history (pause, abort, ...)")
    rollout.add_argument("--full", action="store_true", help="promote: to 100 %% at once, not to the next step")


_SERVER_KEYS = (
    "model_repository",
    "host",
    "http_port",
    "grpc_port",
    "metrics_port",
    "log_level",
    "drain_delay_s",
    "drain_timeout_s",
    "grpc_max_message_bytes",
    "http_max_body_bytes",
    "default_max_batch_size",
    "cpu_threads",
    "scheduler",
    "model_control_mode",
    "repository_poll_secs",
    "load_model",
    "workers",
    "listen_after_load",
    "http_max_header_bytes",
    "http_header_timeout_s",
    "http_body_timeout_s",
    "http_keep_alive_timeout_s",
    "http_max_connections",
    "grpc_max_concurrent_streams",
    "grpc_max_metadata_bytes",
    "grpc_max_connection_idle_s",
    "grpc_max_connection_age_s",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnxgate`` command."""
    parser = argparse.ArgumentParser(prog="onnxgate", description="ONNX model-serving gateway")
    parser.add_argument("--version", action="version", version=f"onnxgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _models_parser(sub)
    _routes_parser(sub)
    from onnxgate import drift_report

    drift_report.add_arguments(
        sub.add_parser("drift", help="per-feature drift of a sample log against a reference; exit 1 on drift")
    )
    args = parser.parse_args(argv)
    if args.command == "drift":
        return drift_report.run(args)
    if args.command == "serve":
        return _serve(args, list(argv if argv is not None else sys.argv[1:])[1:])
    if args.command == "models":
        from onnxgate import admin

        return admin.run_models(args)
    if args.command == "routes":
        from onnxgate import admin_routes

        return admin_routes.run_routes(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The serve arguments minus those the supervisor sets for each worker."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--http-port", "--grpc-port", "--metrics-port"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        config = load(args.config, {k: getattr(args, k) for k in _SERVER_KEYS})
        check_tracing()  # asked for by the OTEL_* environment and impossible: fail before any worker starts
        if config.access_log is not None:
            config.access_log.check_writable()
    except ConfigError as exc:
        print(f"onnxgate: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.server.workers > 1:
        from onnxgate.supervisor import Supervisor

        return Supervisor(config, _worker_argv(argv)).run()
    import uvloop

    from onnxgate.lifecycle import Gateway

    async def run() -> None:
        await Gateway(config).run()

    try:
        uvloop.run(run())
    except OSError as exc:
        print(f"onnxgate: {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:  # e.g. routes naming models the repository does not have
        print(f"onnxgate: {exc.message}", file=sys.stderr)
        return 2
    from onnxgate.core.serving.instances import runs_in_progress

    if running := runs_in_progress():
        # The drain answered their requests; the runs cannot be interrupted, and exiting the
        # usual way under them aborts the process (ONNX Runtime's static destructors).
        logging.getLogger("onnxgate").warning("exiting with %d ONNX Runtime run(s) unfinished", running)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
