"""Security: who may call which endpoint.

The ``security`` config section (``config``), the token table and the check of one call
against an endpoint's scope (``tokens``), the per-peer limit on failed authentications
(``ratelimit``) and the audit log of admin actions (``audit``). The front ends ask it; it knows
nothing of gRPC or HTTP (SECURITY.md has the threat model).

May import: ``onnxgate.errors`` and ``onnxgate.core.sections``. Nothing else of the gateway.
"""
