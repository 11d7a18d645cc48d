"""One key's usage and limits: requests and tokens per minute, concurrency, a daily budget.

Rates are token buckets, as OpenAI describes its own limits: a key with ``rpm: 60`` may send
60 requests at once, then one more each second. Tokens are charged when a request ends (only
then are they known), so the token bucket may go below zero; while it is empty, new requests
wait for it to refill. The daily budget counts tokens from midnight UTC. No aiohttp here.
"""

from __future__ import annotations

import math
import time

import attrs

from llamapool.server.keyfile import ClientKey

#: A response without usage is charged one token per this many bytes, in and out.
BYTES_PER_TOKEN = 4
_DAY = 86400


def estimate_tokens(size: int) -> int:
    """Tokens charged for ``size`` bytes of a request or response that reported no usage."""
    return math.ceil(size / BYTES_PER_TOKEN)


@attrs.define
class Bucket:
    """``capacity`` units, refilled at ``capacity`` per minute."""

    capacity: float
    level: float
    at: float

    @property
    def rate(self) -> float:
        return self.capacity / 60

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait(self, need: float) -> float:
        """Seconds until ``need`` units are there."""
        return max(0.0, (need - self.level) / self.rate)

    def resize(self, capacity: float, now: float) -> None:
        self.refill(now)
        self.capacity, self.level = capacity, min(self.level, capacity)


@attrs.frozen
class Refusal:
    """Why a request is refused: the OpenAI error code, a message, when to retry."""

    limit: str
    code: str
    message: str
    retry_after: float


def _bucket(limit: int | None, now: float, old: Bucket | None) -> Bucket | None:
    if limit is None:
        return None
    if old is None:
        return Bucket(float(limit), float(limit), now)
    old.resize(float(limit), now)
    return old


@attrs.define
class KeyUsage:
    """The running totals and limit state of one key name (kept across reloads)."""

    key: ClientKey
    requests_total: int = 0
    tokens_in_total: int = 0
    tokens_out_total: int = 0
    limited_total: int = 0
    #: Model requests admitted and not finished (waiting in a queue or on a worker).
    active: int = 0
    requests: Bucket | None = None
    tokens: Bucket | None = None
    day: int = 0
    day_tokens: int = 0
    #: In a cluster: the key's requests in progress on the other servers, and what this
    #: server admitted and charged since it last told them (see ``cluster.usage``).
    active_elsewhere: int = 0
    unshared_requests: int = 0
    unshared_tokens: int = 0

    def configure(self, key: ClientKey, now: float | None = None) -> None:
        """Apply a (re)loaded key's limits, keeping what was used so far."""
        now = time.monotonic() if now is None else now
        self.key = key
        self.requests = _bucket(key.rpm, now, self.requests)
        self.tokens = _bucket(key.tpm, now, self.tokens)

    def admit(self, now: float | None = None, wall: float | None = None) -> Refusal | None:
        """Take one request if the limits allow it; otherwise say why not."""
        now = time.monotonic() if now is None else now
        key = self.key
        refusal = self._check(key, now, time.time() if wall is None else wall)
        if refusal is not None:
            self.limited_total += 1
            return refusal
        if self.requests is not None:
            self.requests.level -= 1
        self.active += 1
        self.requests_total += 1
        self.unshared_requests += 1
        return None

    def _check(self, key: ClientKey, now: float, wall: float) -> Refusal | None:
        if key.max_concurrent is not None and (
            self.active + self.active_elsewhere >= key.max_concurrent
        ):
            return Refusal(
                "concurrency",
                "rate_limit_exceeded",
                f"key {key.name!r} has {key.max_concurrent} requests in progress, its limit",
                1,
            )
        if key.daily_tokens is not None:
            self._roll(wall)
            if self.day_tokens >= key.daily_tokens:
                return Refusal(
                    "daily_tokens",
                    "insufficient_quota",
                    f"key {key.name!r} has used its {key.daily_tokens} tokens for today (UTC)",
                    _DAY - wall % _DAY,
                )
        if self.requests is not None:
            self.requests.refill(now)
            if self.requests.level < 1:
                return Refusal(
                    "rpm",
                    "rate_limit_exceeded",
                    f"rate limit reached for key {key.name!r}: {key.rpm} requests per minute",
                    self.requests.wait(1),
                )
        if self.tokens is not None:
            self.tokens.refill(now)
            if self.tokens.level < 1:
                return Refusal(
                    "tpm",
                    "rate_limit_exceeded",
                    f"rate limit reached for key {key.name!r}: {key.tpm} tokens per minute",
                    self.tokens.wait(1),
                )
        return None

    def finish(self, tokens_in: int, tokens_out: int, *, wall: float | None = None) -> None:
        """An admitted request ended, having used these tokens."""
        self.active -= 1
        self.charge(tokens_in, tokens_out, wall=wall)

    def charge(self, tokens_in: int, tokens_out: int, *, wall: float | None = None) -> None:
        used = tokens_in + tokens_out
        self.tokens_in_total += tokens_in
        self.tokens_out_total += tokens_out
        if self.tokens is not None:
            self.tokens.refill(time.monotonic())
            self.tokens.level -= used
        self._roll(time.time() if wall is None else wall)
        self.day_tokens += used
        self.unshared_tokens += used

    def take_unshared(self) -> tuple[int, int]:
        """Requests admitted and tokens charged here since the last call (for the cluster)."""
        taken = self.unshared_requests, self.unshared_tokens
        self.unshared_requests = self.unshared_tokens = 0
        return taken

    def absorb(self, requests: int, tokens: int, now: float | None = None) -> None:
        """Another server of the cluster admitted ``requests`` and charged ``tokens`` for this
        key: they come out of the same rate buckets."""
        now = time.monotonic() if now is None else now
        if self.requests is not None and requests:
            self.requests.refill(now)
            self.requests.level -= requests
        if self.tokens is not None and tokens:
            self.tokens.refill(now)
            self.tokens.level -= tokens

    def day_total(self, total: int, day: int) -> None:
        """The cluster's count of the key's tokens on ``day`` (UTC days since the epoch)."""
        self._roll(time.time())
        if day == self.day:
            self.day_tokens = max(self.day_tokens, total)

    def _roll(self, wall: float) -> None:
        day = int(wall // _DAY)
        if day != self.day:
            self.day, self.day_tokens = day, 0

    def headers(self, now: float | None = None) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the key's request and token limits."""
        now = time.monotonic() if now is None else now
        headers: dict[str, str] = {}
        for unit, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            headers[f"x-ratelimit-limit-{unit}"] = str(int(bucket.capacity))
            headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{unit}"] = duration(bucket.wait(bucket.capacity))
        return headers


def duration(seconds: float) -> str:
    """A wait the way OpenAI's reset headers write it: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after(seconds: float) -> str:
    """``Retry-After``: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
