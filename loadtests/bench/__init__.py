"""The benchmark: raw ONNX Runtime vs the gateway vs bare echo servers, and profiling the gateway.

This package owns ``cli`` (``python -m loadtests.benchmark``: one command, targets, JSON + PNG),
its parts ``common`` (settings, constants, formatting), ``runs`` (environment, raw ORT run, load
sweeps, gateway profiling), ``targets`` (PASS/MISS, unary vs stream) and ``report`` (text report,
plot), and the pieces they run: ``models`` (the ONNX models), ``ort`` (raw ONNX Runtime in
process), ``echo_servers`` (bare servers, the transport ceiling), ``procs`` (server subprocesses,
also used by the tests), ``microbench`` (per-step costs of the request path) and
``profile_report`` (py-spy profile summaries). Load comes from ``loadtests.loadgen``.
"""
