"""A model that keeps its one instance busy, and an HTTP infer in the background: for the tests
of what a queue holds (``serving/test_accepted.py``, ``robustness/test_request_bounds.py``)."""

from __future__ import annotations

import threading

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway import GatewayProcess

SLOW = """
max_batch_size: 256
instance_group [{ count: 1, kind: KIND_CPU }]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
dynamic_batching { default_queue_policy { max_queue_size: 2 } }
"""
GAP_S = 0.3  # the request is inside the gateway, held by a filling worker, by then


class Call(threading.Thread):
    """One HTTP infer in the background; ``outcome`` is the status it got (200 or the error's)."""

    def __init__(self, gw: GatewayProcess, model: str, x: np.ndarray, **kw) -> None:
        super().__init__(daemon=True)
        self.gw, self.model, self.x, self.kw = gw, model, x, kw
        self.outcome: int | str | None = None
        self.y: np.ndarray | None = None

    def run(self) -> None:
        client = httpclient.InferenceServerClient(self.gw.http_url, network_timeout=30.0, connection_timeout=30.0)
        inp = httpclient.InferInput("x", list(self.x.shape), "FP32")
        inp.set_data_from_numpy(self.x)
        try:
            self.y = client.infer(self.model, [inp], **self.kw).as_numpy("y")
            self.outcome = 200
        except InferenceServerException as exc:
            self.outcome = int(exc.status()) if exc.status() and str(exc.status()).isdigit() else str(exc)
        except Exception as exc:  # a timeout: the request was never answered
            self.outcome = f"no answer: {exc!r}"

    def answered(self) -> int | str | None:
        self.join(40)
        return self.outcome
