"""Python client for onnxgate and any Open Inference Protocol (V2) server.

The generated gRPC stubs live in ``onnxgate_client.pb``.
"""

__version__ = "0.1.0"
