"""Load generation and benchmarking for onnxgate (see ``loadtests/README.md``)."""
