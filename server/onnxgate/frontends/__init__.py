"""Protocol front ends: translate wire messages to core calls and back; no serving logic.

``grpc_service`` and ``grpc_codec`` (the V2 gRPC service), ``http_app`` and ``http_codec``
(the V2 REST API as an ASGI app), ``status`` (the one table of error -> HTTP status and gRPC
code). Of the core they import only ``core.service`` (with the records it returns),
``core.inference``, ``core.admission`` and the vocabulary ``core.serving.tensors`` and
``core.serving.stats``.
"""
