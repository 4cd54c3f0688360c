"""What a sample is counted against ``queue_max_mb``, checked against what it really holds:
``sys.getsizeof`` of BYTES elements, the buffer a view keeps alive, shadow answers, and samples
the writer holds while its sink is slow."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import weakref

import numpy as np
from prometheus_client import CollectorRegistry

from onnxgate.core.inference import InferInput, InferOutput, InferRequest, InferResponse
from onnxgate.core.monitoring.records import Sample, ShadowResult
from onnxgate.core.monitoring.sample_log import SampleLogger
from onnxgate.core.monitoring.sample_memory import SAMPLE_OVERHEAD, held_nbytes
from onnxgate.core.monitoring.sinks import Sink
from sample_log_helpers import cfg, run, value

MB = 1024 * 1024
SLACK = SAMPLE_OVERHEAD + 4096  # a sample's objects and tensor headers, whatever the tensors hold


def _sample(inputs: list[InferInput], outputs: list[InferOutput], shadow: list[InferOutput] | None = None) -> Sample:
    request = InferRequest("m", "", inputs, id="r")
    response = InferResponse("m", "1", outputs, id="r")
    result = ShadowResult("cand", InferResponse("cand", "1", shadow)) if shadow is not None else None
    return Sample(request, response, None, "m", "m", "1", "http", 0.001, shadow=result)


def _text(n: int, size: int) -> np.ndarray:
    return np.array([f"{i:08d}" + "€" * size for i in range(n)], dtype=object).reshape(n, 1)


def _truth(*arrays: np.ndarray) -> int:
    """What the arrays hold, measured independently: buffers plus every element's getsizeof."""
    total = 0
    for a in arrays:
        total += a.nbytes
        if a.dtype == object:
            total += sum(sys.getsizeof(v) for v in a.ravel().tolist())
    return total


def test_bytes_tensors_count_every_string() -> None:
    text, upper = _text(4, 100_000), _text(4, 50_000)
    s = _sample([InferInput("text", "BYTES", [4, 1], text)], [InferOutput("upper", "BYTES", [4, 1], upper)])
    truth = _truth(text, upper)
    assert truth > 4 * 150_000  # non-ASCII: two bytes a character
    assert truth <= s.nbytes() <= truth + SLACK


def test_a_view_counts_its_whole_batch_until_compacted_and_then_only_its_rows() -> None:
    batch = np.random.default_rng(0).random((64, 4096), dtype=np.float32)  # one batch's output, 1 MiB
    rows = batch[10:12]
    x = np.ones((2, 4096), np.float32)
    response_outputs = [InferOutput("y", "FP32", [2, 4096], rows)]
    s = _sample([InferInput("x", "FP32", [2, 4096], x)], response_outputs)
    assert s.nbytes() >= batch.nbytes + x.nbytes  # held as is, the sample keeps the whole batch alive
    s.compact()
    assert _truth(x, rows) <= s.nbytes() <= _truth(x, rows) + SLACK
    assert s.response is not None and s.response.outputs[0].data.base is None
    np.testing.assert_array_equal(s.response.outputs[0].data, batch[10:12])
    assert response_outputs[0].data is rows, "the caller's response is not changed"
    gone = weakref.ref(batch)
    del batch, rows, response_outputs
    gc.collect()
    assert gone() is None, "the compacted sample still holds the batch"


def test_an_input_decoded_in_place_counts_the_request_body() -> None:
    body = bytes(64 * 1024) + np.arange(16, dtype=np.float32).tobytes()  # JSON header, other inputs, ...
    x = np.frombuffer(memoryview(body)[-64:], dtype=np.float32).reshape(4, 4)
    assert held_nbytes(x) >= len(body)
    s = _sample([InferInput("x", "FP32", [4, 4], x)], [])
    s.compact()
    assert s.nbytes() <= x.nbytes + SLACK
    own = np.frombuffer(np.arange(16, dtype=np.float32).tobytes(), dtype=np.float32)  # its own bytes: no copy
    assert held_nbytes(own) < own.nbytes + 1024
    s = _sample([InferInput("x", "FP32", [16], own)], [])
    s.compact()
    assert s.request.inputs[0].data is own


def test_shadow_outputs_are_counted_and_compacted() -> None:
    x = np.ones((1, 8), np.float32)
    shadow_batch = np.zeros((32, 8192), np.float32)
    shadow_text = _text(2, 200_000)
    s = _sample(
        [InferInput("x", "FP32", [1, 8], x)],
        [InferOutput("y", "FP32", [1, 8], x * 2)],
        [InferOutput("y", "FP32", [1, 8192], shadow_batch[3:4]), InferOutput("t", "BYTES", [2, 1], shadow_text)],
    )
    assert s.nbytes() >= _truth(x, x, shadow_batch, shadow_text)
    s.compact()
    truth = _truth(x, x, shadow_batch[3:4], shadow_text)
    assert truth <= s.nbytes() <= truth + SLACK


def test_big_strings_fill_the_byte_budget_and_the_rest_are_dropped_and_counted() -> None:
    reg = CollectorRegistry()
    logger = SampleLogger(cfg({"type": "none"}, queue_max_mb=2), reg)  # never started: nothing leaves the queue
    accepted = [logger.offer(_sample([InferInput("text", "BYTES", [1, 1], _text(1, 300_000))], [])) for _ in range(20)]
    assert accepted.count(True) == 3, accepted  # 600 KB each (two bytes a character): three fit in 2 MiB
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="queue_full") == 17
    run(logger.close(1))


class _BlockingSink(Sink):
    """A sink whose writes wait until released: the writer holds what it took off the queue."""

    def __init__(self, stats) -> None:
        super().__init__(stats)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written = 0

    def write(self, records: list[dict]) -> None:
        self.entered.set()
        self.release.wait(20)
        self.written += len(records)
        self.stats.written(len(records))


def test_samples_in_the_writers_hands_stay_counted_until_written() -> None:
    reg = CollectorRegistry()
    logger = SampleLogger(cfg({"type": "none"}, queue_max_mb=1), reg)
    sink = logger.sink = _BlockingSink(logger.metrics)

    def big() -> Sample:  # about 0.6 MiB: one fits the budget, two do not
        return _sample([InferInput("x", "FP32", [150_000], np.ones(150_000, np.float32))], [])

    async def go() -> list[bool]:
        logger.start()
        results = [logger.offer(big())]
        assert await asyncio.to_thread(sink.entered.wait, 10), "the writer did not take the sample"
        results.append(logger.offer(big()))  # the queue is empty, but the writer holds the first one
        sink.release.set()
        for _ in range(500):
            if sink.written:
                break
            await asyncio.sleep(0.01)
        for _ in range(500):  # the budget comes back right after the write
            if logger.offer(big()):
                results.append(True)
                break
            await asyncio.sleep(0.01)
        await logger.close(10)
        return results

    assert run(go()) == [True, False, True]
    assert value(reg, "onnxgate_sample_log_dropped_total", reason="queue_full") >= 1
    assert value(reg, "onnxgate_sample_log_records_total") == 2
