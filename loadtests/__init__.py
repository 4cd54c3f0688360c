"""Load generation and benchmarking for onnxgate (see ``loadtests/README.md``).

``loadtests.loadgen`` is the load generator, ``loadtests.bench`` the benchmark (which drives the
load generator); ``python -m loadtests.benchmark`` runs the benchmark.
"""
