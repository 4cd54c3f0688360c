"""Monitoring: what the gateway records of the traffic it serves.

The sample log: its config section (``config``), the sampled request and its record
(``records``), the logger and its writer thread (``sample_log``), the sinks (``sinks``,
``file_sinks``, ``http_sink``) and the memory accounting of queued samples
(``sample_memory``); drift against a baseline, live and offline (``drift``, ``drift_live``,
``drift_stats``, ``drift_html``).

May import: ``onnxgate.core.serving`` and what serving may import. Not registry or traffic.
"""
