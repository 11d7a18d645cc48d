"""Client keys' limits held across the servers of a cluster.

Each server admits a request against its own view of the key (see
:mod:`llamapool.server.limits`) and, every :data:`SHARE_INTERVAL`, tells the others what it
admitted and charged since, and how many of the key's requests it has in progress. The others
take the requests and tokens out of the same rate buckets and add the requests in progress to
the key's concurrency. Daily budgets are counted in Redis itself (one counter per key name and
UTC day, expiring after two days), so a server that joins or restarts knows what was spent.

The bound: a server hears of the others' use within one interval (plus a pub/sub hop), so in
the worst case the cluster admits, over a key's limit, what the other servers admitted for it
in that interval: with a full bucket at the start, up to one bucket per server. Only key names
cross, never keys.
"""

from __future__ import annotations

import time
from typing import Any

from llamapool.server.keys import KeyStore

#: Seconds between two reports of a server's use of the keys.
SHARE_INTERVAL = 0.25
_DAY = 86400


def day_key(prefix: str, name: str, day: int) -> str:
    return f"{prefix}:day:{day}:{name}"


class SharedUsage:
    """What this server reports of its keys' use, and what it takes in from the others."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        #: Each other server's requests in progress, per key name (whole counts, not deltas).
        self._active: dict[str, dict[str, int]] = {}
        #: What this server last reported in progress per key (a change is worth a report).
        self._reported: dict[str, int] = {}

    def report(self) -> dict[str, list[int]]:
        """Per key name with news: [requests admitted, tokens charged, requests in progress]
        since the last report (taken: the next report starts from zero)."""
        news: dict[str, list[int]] = {}
        for name, usage in self.keys.usage.items():
            requests, tokens = usage.take_unshared()
            if requests or tokens or self._reported.get(name, 0) != usage.active:
                news[name] = [requests, tokens, usage.active]
                self._reported[name] = usage.active
        return news

    def budgets(self) -> list[str]:
        """Key names with a daily budget (counted in Redis)."""
        return [n for n, u in self.keys.usage.items() if u.key.daily_tokens is not None]

    def absorb(self, server: str, news: dict[str, Any]) -> None:
        """Another server's report."""
        now = time.monotonic()
        active = self._active.setdefault(server, {})
        for name, entry in news.items():
            usage = self.keys.usage.get(name)
            if usage is None or not isinstance(entry, list) or len(entry) != 3:
                continue
            requests, tokens, in_progress = (max(0, int(v)) for v in entry)
            usage.absorb(requests, tokens, now)
            active[name] = in_progress
        self._recount()

    def forget(self, server: str) -> None:
        """A server left: its requests in progress no longer count."""
        if self._active.pop(server, None) is not None:
            self._recount()

    def forget_all(self) -> None:
        self._active.clear()
        self._recount()

    def day_totals(self, totals: dict[str, int], day: int) -> None:
        for name, total in totals.items():
            usage = self.keys.usage.get(name)
            if usage is not None:
                usage.day_total(total, day)

    def _recount(self) -> None:
        for name, usage in self.keys.usage.items():
            usage.active_elsewhere = sum(a.get(name, 0) for a in self._active.values())


def today() -> int:
    return int(time.time() // _DAY)
