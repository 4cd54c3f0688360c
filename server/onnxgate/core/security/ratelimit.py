"""A per-peer limit on failed authentications: a token bucket per peer address.

Each peer may fail ``per_minute`` times in a burst, and then once every ``60 / per_minute``
seconds; past that its calls are refused before their token is even looked at (429 /
RESOURCE_EXHAUSTED), so guessing tokens costs the guesser time, not the gateway. At most
``max_peers`` buckets are kept (the least recently failed are forgotten first), so a flood of
addresses costs bounded memory.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from urllib.parse import unquote


class FailureLimiter:
    """Counts failed authentications per peer; tells when a peer has used up its allowance."""

    def __init__(self, per_minute: int, max_peers: int = 4096, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # allowance regained per second
        self.max_peers = max_peers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (allowance, at)

    def _allowance(self, peer: str, now: float) -> float:
        entry = self._buckets.get(peer)
        if entry is None:
            return self.capacity
        allowance, at = entry
        return min(self.capacity, allowance + (now - at) * self.rate)

    def blocked(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: it may now)."""
        if peer not in self._buckets:
            return 0.0
        allowance = self._allowance(peer, self._clock())
        return 0.0 if allowance >= 1.0 else (1.0 - allowance) / self.rate

    def failed(self, peer: str) -> None:
        """Count one failed authentication of ``peer``."""
        now = self._clock()
        allowance = max(0.0, self._allowance(peer, now) - 1.0)
        self._buckets[peer] = (allowance, now)
        self._buckets.move_to_end(peer)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def peer_address(peer: str) -> str:
    """The address of a peer without its port, one form per host: gRPC's ``ipv4:1.2.3.4:5`` and
    ``ipv6:%5B::1%5D:5`` and HTTP's ``1.2.3.4`` / ``::1`` all become the bare address; an
    IPv4-mapped IPv6 address becomes its IPv4 one. Anything else is kept as it is."""
    peer = unquote(peer)
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer[5:]
        if peer.startswith("["):
            peer = peer[1 : peer.find("]")] if "]" in peer else peer
        elif peer.count(":") == 1:
            peer = peer.rsplit(":", 1)[0]
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return peer


def limit_key(address: str) -> str:
    """Whose allowance a failure uses: an IPv4 address, or an IPv6 /64 (one host can hold a
    whole /64, and would otherwise get a fresh allowance per address)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return address
