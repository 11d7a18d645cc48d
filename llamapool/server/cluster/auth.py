"""What servers of one cluster prove to each other with ``CLUSTER_KEY``.

The key itself never leaves a server: not on the wire, not in Redis. A request that crosses
to another server carries a token, ``<origin>.<unix time>.<HMAC>``, valid for
:data:`TOKEN_LIFETIME` seconds, so a captured one is soon worthless and a server that is not
a member cannot make one. What a server publishes in Redis (the address its peers reach it
at) is signed the same way, so whoever can write to Redis still cannot send a cluster's
traffic elsewhere. Several keys may be in force at once, for rotation: the first signs, any
of them verifies (compared in constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import time

import attrs

#: Seconds a request token stays valid (clocks of a cluster's hosts must agree this well).
TOKEN_LIFETIME = 60


@attrs.frozen
class ClusterAuth:
    keys: tuple[str, ...] = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.keys or not all(self.keys):
            raise ValueError("a cluster needs CLUSTER_KEY")

    def sign(self, data: bytes) -> str:
        return _mac(self.keys[0], data)

    def verify(self, data: bytes, signature: str) -> bool:
        ok = False
        for key in self.keys:  # no early exit: every key costs the same time
            ok |= hmac.compare_digest(_mac(key, data), signature)
        return ok

    def token(self, origin: str, *, now: float | None = None) -> str:
        """A request token naming the server ``origin`` it comes from (an id without dots)."""
        stamp = str(int(time.time() if now is None else now))
        return f"{origin}.{stamp}.{self.sign(f'{origin}.{stamp}'.encode())}"

    def origin(self, token: str, *, now: float | None = None) -> str | None:
        """The server a valid, current token comes from; ``None`` for anything else."""
        parts = token.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        origin, stamp, signature = parts
        if abs((time.time() if now is None else now) - int(stamp)) > TOKEN_LIFETIME:
            return None
        if not self.verify(f"{origin}.{stamp}".encode(), signature):
            return None
        return origin


def _mac(key: str, data: bytes) -> str:
    return hmac.new(key.encode(), data, hashlib.sha256).hexdigest()
