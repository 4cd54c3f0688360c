"""gRPC ModelStreamInfer through tritonclient.grpc (start_stream / async_stream_infer) and
tritonclient.grpc.aio (stream_infer).

Replies may come out of order, so they are matched to requests by ``id``. Streamed requests
can share a batch in the gateway, so these tests use element-wise models (add_sub, scaled,
string), whose answers do not depend on how rows are batched; ONNX Runtime computes the
expected values for all requests of a model in one run, sliced per request.

A failed request's reply names its gRPC status (parameter ``grpc_status_code``) and the stream
goes on; with Triton's ``triton_grpc_error: true`` metadata the first failure ends the stream
with that status instead.
"""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from onnxgate_client import Client, RequestFailed
from protocol_helpers import assert_tensor_equal, make_inputs, reference, zoo_feeds

TIMEOUT = 30.0

MODELS = ("add_sub", "string", "scaled")


def _plan(count: int) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """(id, model, feeds) for ``count`` requests over MODELS with 1..4 rows each."""
    return [
        (f"req-{i}", MODELS[i % len(MODELS)], zoo_feeds(MODELS[i % len(MODELS)], rows=1 + i % 4, seed=i))
        for i in range(count)
    ]


def _expected(zoo_repo, plan) -> dict[str, dict[str, np.ndarray]]:
    """Per request id, ONNX Runtime's outputs (one reference run per model, sliced by rows)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for model in MODELS:
        items = [(rid, feeds) for rid, m, feeds in plan if m == model]
        if not items:
            continue
        names = list(items[0][1])
        stacked = {n: np.concatenate([feeds[n] for _, feeds in items]) for n in names}
        version = 3 if model == "scaled" else 1  # no version given: the highest
        ref = reference(zoo_repo, model, stacked, version)
        offset = 0
        for rid, feeds in items:
            rows = feeds[names[0]].shape[0]
            out[rid] = {k: v[offset : offset + rows] for k, v in ref.items()}
            offset += rows
    return out


def _collect(replies: queue.Queue, count: int) -> list:
    got = []
    for _ in range(count):
        try:
            got.append(replies.get(timeout=TIMEOUT))
        except queue.Empty:
            pytest.fail(f"stream gave {len(got)} of {count} replies within {TIMEOUT}s")
    return got


def _by_id(results) -> dict[str, grpcclient.InferResult]:
    by_id: dict[str, grpcclient.InferResult] = {}
    for result, error in results:
        assert error is None, f"unexpected stream error: {error}"
        rid = result.get_response().id
        assert rid not in by_id, f"id {rid!r} answered twice"
        by_id[rid] = result
    return by_id


def _check(by_id, plan, expected) -> None:
    assert sorted(by_id) == sorted(rid for rid, _, _ in plan), "every request answered once, matched by id"
    for rid, model, _ in plan:
        response = by_id[rid].get_response()
        assert response.model_name == model
        for name, arr in expected[rid].items():
            assert_tensor_equal(by_id[rid].as_numpy(name), arr, f"{rid} {name}")


@pytest.fixture
def stream(gateway):
    """A started tritonclient.grpc stream and the queue its callback fills with (result, error)."""
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    yield client, replies
    client.stop_stream()
    client.close()


def test_200_requests_matched_by_id(stream, zoo_repo):
    client, replies = stream
    plan = _plan(200)
    for rid, model, feeds in plan:
        client.async_stream_infer(model, make_inputs("grpc", feeds), request_id=rid)
    _check(_by_id(_collect(replies, len(plan))), plan, _expected(zoo_repo, plan))
    assert replies.empty()


def test_bad_request_fails_alone_and_the_stream_stays_usable(stream, zoo_repo):
    client, replies = stream
    plan = _plan(6)
    bad = {"INPUT0": np.zeros((1, 3), dtype=np.float32), "INPUT1": np.zeros((1, 3), dtype=np.float32)}
    for rid, model, feeds in plan[:3]:
        client.async_stream_infer(model, make_inputs("grpc", feeds), request_id=rid)
    client.async_stream_infer("add_sub", make_inputs("grpc", bad), request_id="bad-shape")
    client.async_stream_infer("no_such_model", make_inputs("grpc", bad), request_id="bad-model")
    got = _collect(replies, 5)
    errors = sorted(str(error) for _, error in got if error is not None)
    assert len(errors) == 2, errors
    assert "no_such_model" in errors[1] or "no_such_model" in errors[0]
    assert any("INPUT0" in e for e in errors), errors
    # The same stream still answers.
    for rid, model, feeds in plan[3:]:
        client.async_stream_infer(model, make_inputs("grpc", feeds), request_id=rid)
    good = [g for g in got if g[1] is None] + _collect(replies, 3)
    _check(_by_id(good), plan, _expected(zoo_repo, plan))


def test_stream_error_carries_the_request_id(gateway):
    """A failed request's reply has error_message and, in infer_response, the request's id."""
    good = zoo_feeds("scaled", rows=1)["x"]

    def requests():
        for rid, shape in (("ok-1", [1, 4]), ("wrong-1", [1, 5]), ("ok-2", [1, 4])):
            req = service_pb2.ModelInferRequest(model_name="scaled", id=rid)
            req.inputs.add(name="x", datatype="FP32", shape=shape)
            req.raw_input_contents.append(good.tobytes() if shape == [1, 4] else np.zeros(5, np.float32).tobytes())
            yield req

    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(requests(), timeout=TIMEOUT))
    by_id = {r.infer_response.id: r for r in replies}
    assert sorted(by_id) == ["ok-1", "ok-2", "wrong-1"]
    assert by_id["wrong-1"].error_message and "x" in by_id["wrong-1"].error_message
    for rid in ("ok-1", "ok-2"):
        reply = by_id[rid]
        assert reply.error_message == ""
        assert len(reply.infer_response.raw_output_contents) == len(reply.infer_response.outputs) == 1


def test_aio_stream(gateway, zoo_repo):
    plan = _plan(60)

    async def run():
        client = grpcaio.InferenceServerClient(gateway.grpc_url)

        async def requests():
            for rid, model, feeds in plan:
                yield {"model_name": model, "inputs": make_inputs("grpc", feeds), "request_id": rid}

        got = []
        try:
            async for result, error in client.stream_infer(inputs_iterator=requests()):
                got.append((result, error))
                if len(got) == len(plan):
                    break
        finally:
            await client.close()
        return got

    got = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    _check(_by_id(got), plan, _expected(zoo_repo, plan))


# -- the status of a failed streamed request (issue 11, defect 12) -------------------------------
GRPC_ERROR = (("triton_grpc_error", "true"),)


def _scaled_request(
    rid: str, width: int = 4, model: str = "scaled", version: str = ""
) -> service_pb2.ModelInferRequest:
    """``scaled`` with one [1, width] row; any width but 4 is bad input."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=rid)
    req.inputs.add(name="x", datatype="FP32", shape=[1, width])
    req.raw_input_contents.append(np.ones(width, np.float32).tobytes())
    return req


class _Stepped:
    """A raw-stub stream whose requests are sent one at a time, after the previous reply."""

    def __init__(self, channel: grpc.Channel, metadata=()) -> None:
        self._requests: queue.Queue = queue.Queue()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.call = stub.ModelStreamInfer(iter(self._requests.get, None), timeout=TIMEOUT, metadata=metadata)

    def ask(self, req: service_pb2.ModelInferRequest) -> service_pb2.ModelStreamInferResponse:
        self._requests.put(req)
        return next(self.call)

    def close(self) -> None:
        self._requests.put(None)


def test_without_the_header_a_failed_request_s_reply_names_its_status_and_the_stream_goes_on(gateway):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stream = _Stepped(channel)
        try:
            for req, code in (
                (_scaled_request("bad-shape", width=5), "INVALID_ARGUMENT"),
                (_scaled_request("no-model", model="no_such_model"), "NOT_FOUND"),
                (_scaled_request("no-version", version="99"), "NOT_FOUND"),
            ):
                rid = req.id
                reply = stream.ask(req)
                assert reply.error_message, reply
                assert reply.infer_response.id == rid
                assert reply.infer_response.parameters["grpc_status_code"].string_param == code, reply
                # the same stream still answers
                ok = stream.ask(_scaled_request(f"ok-after-{rid}"))
                assert ok.error_message == "" and ok.infer_response.id == f"ok-after-{rid}"
                assert "grpc_status_code" not in ok.infer_response.parameters
        finally:
            stream.close()
        assert list(stream.call) == []  # and ends cleanly when the client is done


@pytest.mark.parametrize(("bad", "code"), [
    (lambda: _scaled_request("bad", width=5), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda: _scaled_request("bad", model="no_such_model"), grpc.StatusCode.NOT_FOUND),
])
def test_with_the_header_the_first_failure_closes_the_stream_with_its_status(gateway, bad, code):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stream = _Stepped(channel, GRPC_ERROR)
        try:
            assert stream.ask(_scaled_request("ok-1")).error_message == ""  # successes stream as usual
            with pytest.raises(grpc.RpcError) as failure:
                stream.ask(bad())
            assert failure.value.code() == code, failure.value
            assert failure.value.details(), failure.value
            # the stream is over: nothing more comes, whatever is sent
            with pytest.raises(grpc.RpcError):
                stream.ask(_scaled_request("ok-2"))
        finally:
            stream.close()


def test_only_the_value_true_turns_the_stream_error_mode_on(gateway):
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stream = _Stepped(channel, (("triton_grpc_error", "false"),))
        try:
            reply = stream.ask(_scaled_request("bad", width=5))
            assert reply.infer_response.parameters["grpc_status_code"].string_param == "INVALID_ARGUMENT"
            assert stream.ask(_scaled_request("ok")).error_message == ""
        finally:
            stream.close()


def test_tritonclient_stream_with_triton_grpc_error_ends_with_invalid_argument(gateway, zoo_repo):
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)),
                        headers={"triton_grpc_error": "true"})
    try:
        plan = _plan(3)
        for rid, model, feeds in plan:
            client.async_stream_infer(model, make_inputs("grpc", feeds), request_id=rid)
        _check(_by_id(_collect(replies, 3)), plan, _expected(zoo_repo, plan))
        bad = {"INPUT0": np.zeros((1, 3), dtype=np.float32), "INPUT1": np.zeros((1, 3), dtype=np.float32)}
        client.async_stream_infer("add_sub", make_inputs("grpc", bad), request_id="bad-shape")
        result, error = _collect(replies, 1)[0]
        assert result is None
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "INPUT0" in error.message(), error
        # the stream is closed: tritonclient refuses to send on it
        with pytest.raises(Exception, match="no longer in valid state"):
            client.async_stream_infer("add_sub", make_inputs("grpc", zoo_feeds("add_sub", rows=1, seed=0)))
    finally:
        client.stop_stream()
        client.close()


def test_tritonclient_stream_without_the_header_reports_the_message_and_carries_on(stream, zoo_repo):
    client, replies = stream
    bad = {"INPUT0": np.zeros((1, 3), dtype=np.float32), "INPUT1": np.zeros((1, 3), dtype=np.float32)}
    client.async_stream_infer("add_sub", make_inputs("grpc", bad), request_id="bad-shape")
    result, error = _collect(replies, 1)[0]
    assert result is None and "INPUT0" in error.message() and error.status() is None  # as from Triton
    plan = _plan(3)
    for rid, model, feeds in plan:
        client.async_stream_infer(model, make_inputs("grpc", feeds), request_id=rid)
    _check(_by_id(_collect(replies, 3)), plan, _expected(zoo_repo, plan))


def test_onnxgate_client_stream_failures_carry_the_status_the_server_named(gateway):
    good = {"x": np.ones((1, 4), np.float32)}
    inputs = [good, {"x": np.ones((1, 5), np.float32)}, good]
    with Client(f"grpc://{gateway.grpc_url}") as client:
        results = client.infer_many("scaled", inputs, return_exceptions=True)
        assert isinstance(results[1], RequestFailed) and results[1].index == 1
        assert results[1].code == "INVALID_ARGUMENT" and not results[1].retriable
        assert all(isinstance(results[i], dict) for i in (0, 2)), results
        missing = client.infer_many("no_such_model", [good], return_exceptions=True)
        assert isinstance(missing[0], RequestFailed) and missing[0].code == "NOT_FOUND", missing
