"""Client keys' limits and the queue bounds held across the servers of a cluster.

Each server admits a request against its own view of the key (see
:mod:`llamapool.server.limits`) and, every :data:`SHARE_INTERVAL`, tells the others what it
admitted and charged since, and how many of the key's requests it has in progress. The others
take the requests and tokens out of the same rate buckets and add the requests in progress to
the key's concurrency. Daily budgets are counted in Redis itself (one counter per key name and
UTC day, expiring after two days), so a server that joins or restarts knows what was spent.

The queues are shared the same way: each report says how many requests wait on the server
per model and key, and ``QUEUE_SIZE`` (per key and model) and ``MAX_QUEUED`` (in all) bound the
sum over the servers.

The bound: a server hears of the others' use within one interval (plus a pub/sub hop), so in
the worst case the cluster admits, over a key's limit, what the other servers admitted for it
in that interval: with a full bucket at the start, up to one bucket per server. Only key names
cross, never keys.
"""

from __future__ import annotations

import time
from typing import Any

from llamapool.server.keys import KeyStore
from llamapool.server.scheduler import Scheduler

#: Seconds between two reports of a server's use of the keys.
SHARE_INTERVAL = 0.25
_DAY = 86400


def day_key(prefix: str, name: str, day: int) -> str:
    return f"{prefix}:day:{day}:{name}"


class SharedUsage:
    """What this server reports of its keys' use, and what it takes in from the others."""

    def __init__(self, keys: KeyStore, scheduler: Scheduler) -> None:
        self.keys = keys
        self.scheduler = scheduler
        #: Each other server's waiting requests, per model and key name.
        self._queued: dict[str, dict[str, dict[str, int]]] = {}
        self._queued_total: dict[str, int] = {}
        self._reported_lanes: dict[str, dict[str, int]] = {}
        scheduler.queued_elsewhere = self.queued_elsewhere
        scheduler.queued_elsewhere_total = lambda: sum(self._queued_total.values())
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

    def lanes(self) -> dict[str, dict[str, int]] | None:
        """This server's waiting requests per model and key, if they changed since the last
        report (whole counts)."""
        lanes = self.scheduler.lanes()
        if lanes == self._reported_lanes:
            return None
        self._reported_lanes = lanes
        return lanes

    def queued_elsewhere(self, model: str, key: str) -> int:
        return sum(q.get(model, {}).get(key, 0) for q in self._queued.values())

    def absorb_lanes(self, server: str, lanes: dict[str, Any]) -> None:
        """Another server's waiting requests (whole counts)."""
        clean = {
            str(model): {str(k): max(0, int(n)) for k, n in dict(keys).items()}
            for model, keys in lanes.items()
        }
        self._queued[server] = clean
        self._queued_total[server] = sum(sum(k.values()) for k in clean.values())

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
        """A server left: its requests in progress and waiting no longer count."""
        self._queued.pop(server, None)
        self._queued_total.pop(server, None)
        if self._active.pop(server, None) is not None:
            self._recount()

    def forget_all(self) -> None:
        self._queued.clear()
        self._queued_total.clear()
        self._reported_lanes = {}
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
