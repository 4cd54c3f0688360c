"""Registries: where model directories come from.

A local Triton-style repository (``local``), an object store mirrored into a verified cache
(``object_store``), the MLflow Model Registry (``mlflow_repository``), the local mirror both remote
ones cache into (``mirror``: the cache directory, which deletes only what it made, and its
manifests), and the ``registry`` config section with
:func:`~onnxgate.core.registry.config.open_repository`, which picks one for a
``--model-repository`` location. Each is a ``ModelStore`` (``serving/source.py``): the manager
loads what it finds and the poller follows it, without knowing which registry it is.

May import: ``onnxgate.core.serving`` and what serving may import. Not traffic or monitoring.
"""
