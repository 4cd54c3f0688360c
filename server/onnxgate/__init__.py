"""onnxgate: a high-throughput gateway serving ONNX models over the Open Inference Protocol."""

__version__ = "0.1.0"
