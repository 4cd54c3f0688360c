"""Traffic: which target answers a request, and what else sees it.

Routes split a name over weighted targets, sticky by header (``routes``); shadow traffic
mirrors a primary request to a candidate without ever slowing or failing the primary
(``shadow``); the comparison of primary and shadow answers (``comparison``).

May import: ``onnxgate.core.serving`` and what serving may import. Not registry or monitoring:
the service hands mirrored samples to the sample log through the shadow runner's report hook.
"""
