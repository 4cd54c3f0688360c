"""The tritonclient half of deploy/podman/run-image-check.sh: checks a running onnxgate container.

    check_image.py prepare DIR
        DIR/models: the bundled demo repository plus ``slow`` (a chain of 120 256x256 MatMuls, some
        50-100 ms a request, so requests are in flight when the signal comes); DIR/token: a fresh token;
        DIR/tokens/tokens.yaml: its digest, the file the image's default config names.
    check_image.py serve --http PORT --grpc PORT --metrics PORT --token-file FILE
        waits for readiness, then infers on both transports (answers checked against ONNX Runtime
        run here on the same model files), metadata, statistics, metrics, and refusals without
        the token.
    check_image.py drain --http PORT --grpc PORT --token-file FILE --container NAME [--podman CMD]
        keeps 8 clients (gRPC and HTTP) sending to ``slow``, sends SIGTERM with ``podman kill``
        and waits for the container to exit: exit code 0, readiness false during the drain delay
        (the container runs with ``--drain-delay-s 1``), every request in flight at the signal
        answered correctly, and every request the gateway accepted answered correctly (refusals:
        503 / UNAVAILABLE or a closed connection, only once the signal was sent).

Needs numpy, onnx, onnxruntime and tritonclient[grpc,http] (the project venv after `make test`).
Exit status 0 when every check passed, 1 otherwise (what failed is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "server" / "onnxgate" / "demo" / "models"
N, LAYERS, ROWS = 256, 120, 16
REFUSED = {"503", "StatusCode.UNAVAILABLE"}
# grpcio's server cancels calls that reach it while it stops, before any handler saw them: the client
# sees CANCELLED for a request that was never accepted. A refusal only once the signal was sent.
RACING_STOP = "StatusCode.CANCELLED"


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# -- prepare ----------------------------------------------------------------------------------


def build_slow(repo: Path) -> None:
    """``x`` float32 [batch, N] -> outer product with ones -> LAYERS x (MatMul W, Tanh) -> mean -> ``y``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.RandomState(7).randn(N, N) / np.sqrt(N)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["x", "axis"], ["x3"]), helper.make_node("Mul", ["x3", "ones"], ["m0"])]
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "w"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{LAYERS}"], ["y"], axes=[1], keepdims=0))
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axis"),
             numpy_helper.from_array(np.ones((1, N), np.float32), "ones"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxgate-image-check")
    model.ir_version = 8
    onnx.checker.check_model(model)
    (repo / "slow" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "slow" / "1" / "model.onnx"))
    # No batching: requests queue one after another, so most of them have waited a while at any moment.
    (repo / "slow" / "config.pbtxt").write_text('name: "slow"\nmax_batch_size: 0\n')


def prepare(work: Path) -> None:
    """Everything the container mounts, readable by its user (10001), which owns none of it."""
    models = work / "models"
    if models.exists():
        shutil.rmtree(models)
    shutil.copytree(DEMO, models)
    build_slow(models)
    (work / "tokens").mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    token_file = work / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    digest = hashlib.sha256(token.encode()).hexdigest()
    (work / "tokens" / "tokens.yaml").write_text(
        f'tokens:\n  - {{name: image-check, sha256: "{digest}", scopes: [admin, read, infer]}}\n')
    for path in [work, *work.rglob("*")]:
        if path != token_file:
            path.chmod(0o755 if path.is_dir() else 0o644)
    print(f"prepared {work}: models {sorted(p.name for p in models.iterdir())}, tokens file with one digest")


# -- serve ------------------------------------------------------------------------------------


def reference(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def wait_ready(http_port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise CheckFailed(f"/v2/health/ready on 127.0.0.1:{http_port} not 200 within {timeout:.0f}s (last: {last})")


def serve(args: argparse.Namespace) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    token = Path(args.token_file).read_text().strip()
    # a copy for every call: tritonclient.http adds its own headers (int values) to the dict it is given
    auth = {"authorization": f"Bearer {token}"}  # lowercase: a gRPC metadata key
    t0 = time.monotonic()
    wait_ready(args.http, args.timeout)
    print(f"ready after {time.monotonic() - t0:.1f}s")
    x = np.random.RandomState(0).rand(3, 16).astype(np.float32)
    want = {v: reference(DEMO / "mlp" / v / "model.onnx", {"x": x})["y"] for v in ("1", "2")}
    iris = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)
    iris_want = reference(DEMO / "iris_classifier" / "1" / "model.onnx", {"input": iris})["label"]

    clients = {"http": (httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{args.http}")),
               "grpc": (grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{args.grpc}"))}
    for protocol, (mod, client) in clients.items():
        check(client.is_server_live() and client.is_server_ready(), f"{protocol}: server not live and ready")
        check(client.is_model_ready("mlp", headers=dict(auth)), f"{protocol}: mlp not ready")
        meta = client.get_model_metadata("mlp", headers=dict(auth))
        versions = meta["versions"] if protocol == "http" else list(meta.versions)
        check(sorted(versions) == ["1", "2"], f"{protocol}: mlp versions {versions}")
        for version in ("", "1", "2"):
            inp = mod.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("mlp", [inp], model_version=version, headers=dict(auth))
            got = result.as_numpy("y")
            expected = want[version or "2"]  # no version: the highest ready one
            check(got is not None and np.allclose(got, expected, rtol=1e-5, atol=1e-6),
                  f"{protocol}: mlp version {version or '(highest)'} answered {got!r}, ONNX Runtime says {expected!r}")
        inp = mod.InferInput("input", list(iris.shape), "FP32")
        inp.set_data_from_numpy(iris)
        labels = client.infer("iris_classifier", [inp], headers=dict(auth)).as_numpy("label")
        check(labels is not None and labels.tolist() == iris_want.tolist() == [0, 2],
              f"{protocol}: iris_classifier labels {labels!r}, ONNX Runtime says {iris_want!r}")
        stats = client.get_inference_statistics("mlp", headers=dict(auth))
        check(bool(stats), f"{protocol}: no statistics for mlp")
        inp = mod.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            client.infer("mlp", [inp])
            raise CheckFailed(f"{protocol}: an infer without the token was answered")
        except InferenceServerException as exc:
            check(exc.status() in ("401", "StatusCode.UNAUTHENTICATED"),
                  f"{protocol}: an infer without the token got {exc.status()} {exc.message()}, "
                  "not 401 / UNAUTHENTICATED")
        print(f"{protocol}: live, ready, metadata, mlp v1/v2/highest and iris_classifier as ONNX Runtime answers, "
              "statistics, no token -> refused")
    conn = http.client.HTTPConnection("127.0.0.1", args.metrics, timeout=5)
    conn.request("GET", "/metrics", headers=auth)
    response = conn.getresponse()
    body = response.read().decode()
    check(response.status == 200 and "onnxgate_requests_total" in body,
          f"metrics: HTTP {response.status}, {len(body)} bytes, onnxgate_requests_total missing")
    print("metrics: onnxgate_requests_total exported")


# -- drain ------------------------------------------------------------------------------------


@dataclass
class Call:
    protocol: str
    start: float
    end: float
    outcome: str  # ok | refused | racing | conn | wrong | error
    detail: str = ""


def _worker(idx: int, args: argparse.Namespace, auth: dict, x: np.ndarray, y: np.ndarray,
            stop: threading.Event, calls: list[Call], lock: threading.Lock) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    protocol = ("grpc", "http")[idx % 2]
    mod = grpcclient if protocol == "grpc" else httpclient
    client = None
    row = idx % ROWS
    while not stop.is_set():
        start = time.monotonic()
        try:
            if client is None:
                client = (grpcclient.InferenceServerClient(f"127.0.0.1:{args.grpc}") if protocol == "grpc" else
                          httpclient.InferenceServerClient(f"127.0.0.1:{args.http}", connection_timeout=5.0,
                                                           network_timeout=60.0))
            inp = mod.InferInput("x", [1, N], "FP32")
            inp.set_data_from_numpy(x[row : row + 1])
            got = client.infer("slow", [inp], headers=dict(auth)).as_numpy("y")
            good = got is not None and got.shape == (1, N) and np.allclose(got[0], y[row], rtol=1e-4, atol=1e-5)
            outcome, detail = ("ok", "") if good else ("wrong", f"row {row}: {got!r}")
        except InferenceServerException as exc:
            status = exc.status()
            outcome = "refused" if status in REFUSED else "racing" if status == RACING_STOP else "error"
            detail = f"{status} {exc.message()}"
            if status == "StatusCode.UNAVAILABLE":
                client = None
        except Exception as exc:  # connection refused / reset: no answer at all
            outcome, detail = "conn", f"{type(exc).__name__}: {exc}"
            client = None
        with lock:
            calls.append(Call(protocol, start, time.monotonic(), outcome, detail))
        if outcome != "ok":
            time.sleep(0.02)


def _poll_ready(args: argparse.Namespace, stop: threading.Event, seen: list[tuple[float, int]]) -> None:
    while not stop.is_set():
        t = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", args.http, timeout=2)
            conn.request("GET", "/v2/health/ready")
            status = conn.getresponse().status
            conn.close()
        except OSError:
            status = 0  # listener closed
        seen.append((t, status))
        time.sleep(0.05)


def _show(calls: list[Call], t0: float) -> str:
    return "; ".join(f"{c.protocol} {c.start - t0:+.3f}s..{c.end - t0:+.3f}s {c.outcome} {c.detail[:100]}"
                     for c in calls[:5])


def verdict(calls: list[Call], t_signal: float, t_exit: float, min_in_flight: int = 3) -> list[str]:
    """What went wrong, as sentences (empty: nothing). Times are monotonic; messages say them
    relative to the signal."""
    problems = []
    bad = [c for c in calls if c.outcome in ("wrong", "error")
           or (c.outcome in ("refused", "racing", "conn") and c.start < t_signal - 0.02)]
    if bad:
        problems.append(f"{len(bad)} requests failed, came back wrong or were refused before the signal: "
                        f"{_show(bad, t_signal)}")
    before = [c for c in calls if c.end < t_signal]
    if sum(c.outcome == "ok" for c in before) < 5:
        problems.append(f"too little load before the signal: {len(before)} calls")
    in_flight = [c for c in calls if c.start < t_signal - 0.05 and c.end > t_signal]
    if len(in_flight) < min_in_flight:
        problems.append(f"only {len(in_flight)} requests were in flight at the signal (want >= {min_in_flight})")
    dropped = [c for c in in_flight if c.outcome != "ok"]
    if dropped:
        problems.append(f"{len(dropped)} of {len(in_flight)} requests in flight at the signal were not answered: "
                        f"{_show(dropped, t_signal)}")
    after_exit = [c for c in calls if c.start > t_exit and c.outcome not in ("refused", "racing", "conn")]
    if after_exit:
        problems.append(f"requests sent after the container exited were not refused: {_show(after_exit, t_signal)}")
    served_after = {c.protocol for c in calls if c.outcome == "ok" and c.end > t_signal}
    if served_after != {"grpc", "http"}:
        problems.append(f"requests answered after the signal on {sorted(served_after)} only, want grpc and http")
    return problems


def drain(args: argparse.Namespace) -> None:
    podman = shlex.split(args.podman)
    token = Path(args.token_file).read_text().strip()
    auth = {"authorization": f"Bearer {token}"}  # lowercase: a gRPC metadata key
    wait_ready(args.http, args.timeout)
    slow = Path(args.work) / "models" / "slow" / "1" / "model.onnx"
    x = np.random.RandomState(3).uniform(-2, 2, (ROWS, N)).astype(np.float32)
    y = reference(slow, {"x": x})["y"]
    calls: list[Call] = []
    seen: list[tuple[float, int]] = []
    stop = threading.Event()
    lock = threading.Lock()
    threads = [threading.Thread(target=_worker, args=(i, args, auth, x, y, stop, calls, lock), daemon=True)
               for i in range(args.clients)]
    threads.append(threading.Thread(target=_poll_ready, args=(args, stop, seen), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(c.outcome == "ok" for c in list(calls)) < 20:
        if time.monotonic() > deadline:
            stop.set()
            raise CheckFailed(f"no steady load within 60s: {_show(list(calls), time.monotonic())}")
        time.sleep(0.05)
    time.sleep(0.3)
    t_signal = time.monotonic()
    subprocess.run([*podman, "kill", "--signal", "TERM", args.container], check=True, capture_output=True)
    waited = subprocess.run([*podman, "wait", args.container], capture_output=True, text=True, timeout=90)
    t_exit = time.monotonic()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(90)
    check(not any(t.is_alive() for t in threads), "client threads hung after the container exited")
    code = waited.stdout.strip().splitlines()[-1] if waited.stdout.strip() else f"? ({waited.stderr.strip()})"
    calls = list(calls)
    ok = sum(c.outcome == "ok" for c in calls)
    refused = sum(c.outcome in ("refused", "racing", "conn") for c in calls)
    in_flight = sum(c.start < t_signal - 0.05 and c.end > t_signal for c in calls)
    print(f"drain: {len(calls)} requests, {ok} answered ({in_flight} in flight at the signal), {refused} refused "
          "after the signal; "
          f"container exited {t_exit - t_signal:.2f}s after SIGTERM with code {code}")
    problems = verdict(calls, t_signal, t_exit)
    if code != "0":
        problems.append(f"the container exited with code {code}, not 0")
    after = [s for t, s in seen if t > t_signal + 0.3]
    if 503 not in [s for t, s in seen if t_signal + 0.3 < t < t_signal + 0.9]:
        problems.append(f"/v2/health/ready did not answer 503 during the drain delay (seen after the signal: "
                        f"{sorted(set(after))})")
    if 200 in after:
        problems.append("/v2/health/ready answered 200 after the signal")
    if problems:
        raise CheckFailed("drain: " + "\n  ".join(problems))
    print("drain: readiness false during the delay, every request in flight at the signal answered, "
          "nothing accepted failed, exit 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("work")
    for name in ("serve", "drain"):
        p = sub.add_parser(name)
        p.add_argument("--http", type=int, required=True)
        p.add_argument("--grpc", type=int, required=True)
        p.add_argument("--token-file", required=True)
        p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness")
        if name == "serve":
            p.add_argument("--metrics", type=int, required=True)
        else:
            p.add_argument("--work", required=True, help="the directory `prepare` wrote")
            p.add_argument("--container", required=True)
            p.add_argument("--podman", default=os.environ.get("PODMAN", "podman"))
            p.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(Path(args.work))
        elif args.command == "serve":
            serve(args)
        else:
            drain(args)
    except CheckFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
