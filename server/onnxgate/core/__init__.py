"""The gateway's core: everything between a decoded request and its answer. Knows nothing of
gRPC or HTTP, and imports no front end.

Capabilities, one package each (ARCHITECTURE.md has the map and the import rule, which
``tests/test_architecture.py`` enforces):

- ``serving``: datatypes, model config, sessions, one model version, the batcher, the manager
  (lifecycle and swap), the poller, statistics;
- ``registry``: where models come from (a local directory, an object store, MLflow);
- ``traffic``: routes, shadow traffic and the comparison of answers;
- ``monitoring``: the sample log (records, sinks) and drift;
- ``security``: tokens, scopes, the failure limit and the audit log.

At the top: ``service`` (the one entry point for front ends), ``admission`` (the request
memory budget) and ``exchange`` (one request's id, in-flight count, span and access-log entry)
above the capabilities; ``inference`` (the request and response), ``metrics`` (the Prometheus
families), ``tracing`` (OpenTelemetry, when configured), ``sections`` (config-section parsing)
and ``urls`` (redacting URLs for the log) below them, imported by all.
"""
