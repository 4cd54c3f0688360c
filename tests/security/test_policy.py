"""The access policy's parts on their own: the failure limiter's arithmetic and bound, peer
addresses, the scope rule, loopback detection, token lookup, and the HTTP router's matching."""

from __future__ import annotations

import hashlib

import pytest

from onnxgate.core.security.access import AccessPolicy, TokenTable, allows, is_loopback
from onnxgate.core.security.config import SecurityConfig, TokenSpec
from onnxgate.core.security.ratelimit import FailureLimiter, peer_address
from onnxgate.errors import Overloaded, PermissionDenied, Unauthenticated
from onnxgate.frontends.endpoints import ENDPOINTS, HttpRouter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_allows_a_burst_then_one_per_interval():
    clock = Clock()
    limiter = FailureLimiter(6, clock=clock)  # one regained every 10 s
    for _ in range(6):
        assert limiter.blocked("a") == 0.0
        limiter.failed("a")
    assert limiter.blocked("a") == pytest.approx(10.0)
    assert limiter.blocked("b") == 0.0  # per peer
    clock.now += 10.0
    assert limiter.blocked("a") == 0.0
    limiter.failed("a")
    assert limiter.blocked("a") == pytest.approx(10.0)


def test_limiter_memory_is_bounded():
    limiter = FailureLimiter(1, max_peers=100, clock=Clock())
    for i in range(10_000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    assert limiter.blocked("10.0.39.15") > 0  # the newest are kept


@pytest.mark.parametrize(("peer", "address"), [
    ("ipv4:10.1.2.3:5000", "10.1.2.3"), ("ipv6:[::1]:5000", "::1"), ("ipv6:[fe80::1%eth0]:1", "fe80::1%eth0"),
    ("ipv6:%5B::1%5D:48072", "::1"),  # grpcio percent-encodes the brackets
    ("ipv6:[::ffff:1.2.3.4]:1", "1.2.3.4"), ("::ffff:1.2.3.4", "1.2.3.4"),  # one host, one form
    ("10.1.2.3", "10.1.2.3"), ("unix:/tmp/s", "unix:/tmp/s"), ("", ""),
])
def test_peer_address(peer, address):
    assert peer_address(peer) == address


def test_one_ipv6_64_shares_an_allowance():
    policy = _policy(auth_failures_per_minute=1)
    with pytest.raises(Unauthenticated):
        policy.check("infer", False, None, "2001:db8::1")
    with pytest.raises(Overloaded):
        policy.check("infer", False, "Bearer secret", "2001:db8::ffff")  # the same /64
    assert policy.check("infer", False, "Bearer secret", "2001:db8:0:1::1").name == "app"


@pytest.mark.parametrize("header", ["Bearer ", "Bearer \t", "Bearer \xa0", "bearer", ""])
def test_an_empty_token_never_matches(header):
    policy = _policy()
    with pytest.raises(Unauthenticated):
        policy.check("infer", False, header, "1.1.1.1")


def test_the_digest_of_an_empty_token_is_refused():
    from onnxgate.errors import ConfigError

    empty = hashlib.sha256(b"").hexdigest()
    with pytest.raises(ConfigError, match="empty token"):
        SecurityConfig.from_dict({"tokens": [{"name": "a", "sha256": empty, "scopes": ["admin"]}]})


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("gateway.internal", False), ("", False),
])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("scopes", "scope", "read_only", "allowed"), [
    ({"infer"}, "infer", False, True), ({"read"}, "infer", False, False), ({"read"}, "infer", True, True),
    ({"read"}, "read", True, True), ({"infer"}, "read", True, False), ({"admin"}, "infer", True, False),
    ({"admin"}, "admin", False, True), ({"infer", "read"}, "admin", False, False), (set(), "public", True, True),
])
def test_scope_rule(scopes, scope, read_only, allowed):
    assert allows(frozenset(scopes), scope, read_only) is allowed


def _policy(**kw) -> AccessPolicy:
    digest = hashlib.sha256(b"secret").hexdigest()
    config = SecurityConfig(tokens=(TokenSpec("app", digest, frozenset({"infer"})),), **kw)
    return AccessPolicy(config, "0.0.0.0")


def test_token_lookup_is_by_digest():
    table = TokenTable([TokenSpec("a", hashlib.sha256(b"x").hexdigest(), frozenset({"read"}))])
    assert table.lookup("x").name == "a"
    assert table.lookup("x ") is None and table.lookup("") is None and table.lookup("\udcff") is None


def test_policy_check():
    policy = _policy()
    assert policy.check("infer", False, "Bearer secret", "1.1.1.1").name == "app"
    assert policy.check("infer", False, "bearer  secret ", "1.1.1.1").name == "app"  # scheme is case-blind
    assert policy.check("public", False, None, "1.1.1.1").name == ""
    with pytest.raises(Unauthenticated):
        policy.check("infer", False, None, "1.1.1.1")
    with pytest.raises(PermissionDenied) as denied:
        policy.check("admin", False, "Bearer secret", "1.1.1.1")
    assert denied.value.token_name == "app"


def test_policy_blocks_a_failing_peer_only():
    policy = _policy(auth_failures_per_minute=2)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            policy.check("infer", False, "Bearer nope", "ipv4:2.2.2.2:1")
    with pytest.raises(Overloaded):
        policy.check("infer", False, "Bearer secret", "2.2.2.2")  # the same address over HTTP
    assert policy.check("infer", False, "Bearer secret", "3.3.3.3").name == "app"


def test_client_certificate_required_before_tokens():
    policy = AccessPolicy(SecurityConfig(), "127.0.0.1", require_client_cert=True)
    assert policy.guards("infer") and not policy.guards("public")
    with pytest.raises(Unauthenticated):
        policy.check("infer", True, None, "1.1.1.1", client_cert=False)
    assert policy.check("infer", True, None, "1.1.1.1", client_cert=True).name == ""


def test_router_matches_every_declared_route_and_nothing_else():
    router = HttpRouter()
    for endpoint in ENDPOINTS:
        for method, template in endpoint.http:
            parts = [("m1" if s == "{model}" else "3" if s == "{version}" else "r1" if s == "{route}" else s)
                     for s in template.strip("/").split("/")]
            methods, params = router.match(parts)
            assert methods[method] is endpoint
            assert set(params) == {s[1:-1] for s in template.split("/") if s.startswith("{")}
    assert router.match(["v2", "models", "stats"])[0]["GET"].name == "stats.all"  # literal before {model}
    for parts in (["v2", "models"], ["v3"], ["v2", "models", "m", "bogus"], [], ["v2", "models", "m", "versions"]):
        assert router.match(parts) is None
