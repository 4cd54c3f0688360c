"""Load generator: one worker process -- closed and open loops over one client, timed and counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from loadtests.loadgen.grpc_client import _GrpcStreams, _GrpcUnary
from loadtests.loadgen.http_client import _AiohttpClient, _RawHttp
from loadtests.loadgen.payload import Payload, Target

_SPIN_NS = 1_200_000  # open loop: the last part of a wait is spun (uvloop timers round to 1 ms)


def _make_client(target: Target, payload: Payload) -> Any:
    if target.transport == "grpc":
        return _GrpcStreams(target, payload) if target.grpc_mode == "stream" else _GrpcUnary(target, payload)
    return _AiohttpClient(target, payload) if target.http_client == "aiohttp" else _RawHttp(target, payload)


class _Recorder:
    """What one worker saw in the measured window."""

    def __init__(self) -> None:
        self.latency_ns = array("q")
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.last_done_ns = 0
        self.lag_sum_ns = 0
        self.lag_max_ns = 0
        self.lag_count = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


async def _call(infer: Callable, mono: Callable[[], int]) -> tuple[str | None, int]:
    try:
        err = await infer()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a client bug must not kill the run; count it
        err = "client:" + type(exc).__name__
    return err, mono()


async def _closed_loop(client: Any, ph: dict, rec: _Recorder) -> None:
    mono = time.monotonic_ns
    measure_ns, end_ns = ph["measure_ns"], ph["end_ns"]
    quota = [ph["requests"]] if ph["requests"] is not None else None
    infer = client.infer
    lat = rec.latency_ns

    async def one_client() -> None:
        while True:
            t0 = mono()
            if end_ns and t0 >= end_ns:
                return
            counted = t0 >= measure_ns
            if counted and quota is not None:
                if quota[0] <= 0:
                    return
                quota[0] -= 1
            err, t1 = await _call(infer, mono)
            if counted:
                if err is None:
                    rec.ok += 1
                    lat.append(t1 - t0)
                else:
                    rec.error(err)
                if t1 > rec.last_done_ns:
                    rec.last_done_ns = t1

    await asyncio.gather(*(one_client() for _ in range(ph["concurrency"])))


async def _open_loop(client: Any, ph: dict, rec: _Recorder) -> None:
    loop = asyncio.get_running_loop()
    mono = time.monotonic_ns
    measure_ns, end_ns = ph["measure_ns"], ph["end_ns"]
    quota = ph["requests"]
    rate = ph["rate"]
    poisson = ph["arrival"] == "poisson"
    rng = random.Random(ph["seed"])
    interval_ns = 1e9 / rate
    max_inflight = ph["max_inflight"]
    infer = client.infer
    lat = rec.latency_ns
    inflight = 0
    tasks: set[asyncio.Task] = set()

    async def one(intended: int, counted: bool) -> None:
        nonlocal inflight
        sent = mono()
        err, done = await _call(infer, mono)
        inflight -= 1
        if counted:
            lag = sent - intended
            rec.lag_sum_ns += lag
            rec.lag_count += 1
            if lag > rec.lag_max_ns:
                rec.lag_max_ns = lag
            if err is None:
                rec.ok += 1
                lat.append(done - intended)
            else:
                rec.error(err)
            if done > rec.last_done_ns:
                rec.last_done_ns = done

    next_ns = float(ph["start_ns"] + ph["offset_ns"])
    if poisson:
        next_ns += rng.expovariate(1.0) * interval_ns
    running = True
    while running:
        now = mono()
        while next_ns <= now:
            intended = int(next_ns)
            if end_ns and intended >= end_ns:
                running = False
                break
            counted = intended >= measure_ns
            if counted and quota is not None:
                if quota <= 0:
                    running = False
                    break
                quota -= 1
            if inflight >= max_inflight:
                if counted:
                    rec.error("client_overflow")
            else:
                inflight += 1
                task = loop.create_task(one(intended, counted))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_ns += rng.expovariate(1.0) * interval_ns if poisson else interval_ns
        if not running:
            break
        wait = next_ns - mono()
        if wait > _SPIN_NS:
            await asyncio.sleep((wait - _SPIN_NS) / 1e9)
        else:
            await asyncio.sleep(0)
    if tasks:
        timeout = (ph["timeout_s"] or 30.0) + 5.0
        _, late = await asyncio.wait(set(tasks), timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            rec.error("timeout")  # at least one; exact count below
            rec.errors["timeout"] += len(late) - 1


async def _run_phase(client: Any, ph: dict) -> dict:
    rec = _Recorder()
    if (ph["mode"] == "closed" and ph["concurrency"] <= 0) or (ph["mode"] == "open" and ph["rate"] <= 0):
        return _worker_result(rec, 0.0, 0)
    await _sleep_until(ph["start_ns"])
    cpu: dict[str, float] = {}

    async def cpu_probe() -> None:
        await _sleep_until(ph["measure_ns"])
        cpu["t0"], cpu["c0"] = time.monotonic(), time.process_time()
        if ph["end_ns"]:
            await _sleep_until(ph["end_ns"])
            cpu["t1"], cpu["c1"] = time.monotonic(), time.process_time()

    probe = asyncio.get_running_loop().create_task(cpu_probe())
    if ph["mode"] == "closed":
        await _closed_loop(client, ph, rec)
    else:
        await _open_loop(client, ph, rec)
    if not probe.done():
        if "t0" in cpu:  # request-count mode: the window ends now
            cpu["t1"], cpu["c1"] = time.monotonic(), time.process_time()
        probe.cancel()
    if "t1" in cpu:
        return _worker_result(rec, cpu["c1"] - cpu["c0"], cpu["t1"] - cpu["t0"])
    return _worker_result(rec, 0.0, 0.0)


def _worker_result(rec: _Recorder, cpu_s: float, cpu_wall_s: float) -> dict:
    return {
        "latency_ns": rec.latency_ns.tobytes(),
        "ok": rec.ok,
        "errors": rec.errors,
        "last_done_ns": rec.last_done_ns,
        "lag_sum_ns": rec.lag_sum_ns,
        "lag_max_ns": rec.lag_max_ns,
        "lag_count": rec.lag_count,
        "cpu_s": cpu_s,
        "cpu_wall_s": cpu_wall_s,
    }


async def _worker(conn: Any, target: Target, payload: Payload) -> None:
    loop = asyncio.get_running_loop()
    client = _make_client(target, payload)
    try:
        await client.start()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            command, arg = await loop.run_in_executor(None, conn.recv)
            if command == "stop":
                break
            conn.send(("result", await _run_phase(client, arg)))
    finally:
        await client.close()


def _worker_main(conn: Any, target: Target, payload: Payload, cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    with contextlib.suppress(EOFError, KeyboardInterrupt, BrokenPipeError):
        if target.loop == "asyncio":
            asyncio.run(_worker(conn, target, payload))
        else:
            import uvloop

            uvloop.run(_worker(conn, target, payload))
