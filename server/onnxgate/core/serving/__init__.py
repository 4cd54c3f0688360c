"""Serving: running requests on ONNX Runtime.

Owns the V2 datatypes and tensor codecs (``tensors``), model configs (``model_config``),
sessions and their threads (``sessions``, ``instances``), one loaded version (``model``), the
dynamic batcher (``batcher``), the model lifecycle and hot swap (``manager``, ``poller``), what a
version is loaded from (``source``: model directories and the ``ModelStore`` protocol every
registry implements), the files a config names and the rule that keeps them in the model's
directory (``model_files``), the outputs of an answer (``outputs``) and statistics (``stats``,
``stats_share``).

May import: ``onnxgate.errors``, ``onnxgate.core.inference``, ``onnxgate.core.metrics``,
``onnxgate.core.sections``, ``onnxgate.core.urls``. Nothing else of the gateway: registries,
traffic and monitoring build on serving, never the reverse.
"""
