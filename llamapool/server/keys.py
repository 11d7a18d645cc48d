"""The client keys in force, who sent each request, and what each key has used.

:class:`KeyStore` is the one owner of the client keys: it reads ``API_KEY`` and ``KEYS_FILE``,
reloads the file on SIGHUP and when it changes (a bad file is logged with its line and the
keys in force stay), answers which key a presented value is, and keeps each key name's
usage, limits and Prometheus series. Requests carry their :class:`Caller` (the key's name,
never its value) from the auth middleware to the scheduler and the logs. :class:`KeysFile`,
the reloading, is shared with the worker keys (:mod:`llamapool.server.worker_keys`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import structlog
from aiohttp import web

from llamapool.errors import ConfigError
from llamapool.server.keyfile import ANONYMOUS, OPEN, Caller, ClientKey, KeyRing, read_keys_file
from llamapool.server.limits import KeyUsage, Refusal
from llamapool.server.metrics import ServerMetrics
from llamapool.server.usage import Usage

log = structlog.get_logger("llamapool.server")

#: Who sent a request to a route behind the API key (set by the auth middleware).
CALLER = web.RequestKey("llamapool_caller", Caller)
#: Set by the relay once a worker took the request: the usage its response reported, if any.
USAGE: web.RequestKey[Usage | None] = web.RequestKey("llamapool_usage")


def caller_of(request: web.Request) -> Caller | None:
    return request.get(CALLER)


def visible(request: web.Request, model: str) -> bool:
    """Whether the request's key may see (and use) ``model``."""
    caller = request.get(CALLER)
    return caller is None or caller.key.allows(model)


def record_usage(request: web.Request, usage: Usage | None) -> None:
    """The relay says a worker served the request, and what usage its response reported."""
    request[USAGE] = usage


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: its modification time, size and inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeysFile:
    """A keys file in force: read again on SIGHUP and whenever it changes; a bad file is
    logged with its line and the keys in force stay. Subclasses apply what was read."""

    #: The events of a reload and of a bad file.
    RELOADED = "keys_reloaded"
    INVALID = "keys_file_invalid"

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp = _stamp(path) if path else None

    def _load(self) -> int:
        """Read the file and apply its keys; how many; :class:`ConfigError` if it is bad."""
        raise NotImplementedError

    def reload(self) -> bool:
        """Read the file again; on any problem, log it and keep the keys in force."""
        if not self.path:
            return False
        self._stamp = _stamp(self.path)
        try:
            count = self._load()
        except ConfigError as exc:
            log.error(self.INVALID, error=str(exc), hint="the previous keys stay in force")
            return False
        log.info(self.RELOADED, path=self.path, keys=count)
        return True

    def poll(self) -> None:
        """Reload if the file changed since it was last read (cheap: one ``stat``)."""
        if self.path and _stamp(self.path) != self._stamp:
            self.reload()


class KeyStore(KeysFile):
    """The accepted client keys and each key name's usage."""

    def __init__(
        self,
        plain: tuple[str, ...] = (),
        path: str = "",
        *,
        metrics: ServerMetrics | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(path)
        self.plain = plain
        #: Whether requests need a key: any API_KEY, or a KEYS_FILE (even one listing none).
        self.required = bool(plain or path)
        self._metrics = metrics
        self._on_change = on_change
        self.ring = KeyRing.build(plain, read_keys_file(path) if path else ())
        self.usage: dict[str, KeyUsage] = {}
        self._sync()

    def authenticate(self, presented: str) -> ClientKey | None:
        return self.ring.lookup(presented)

    def _load(self) -> int:
        named = read_keys_file(self.path)
        self.ring = KeyRing.build(self.plain, named)
        self._sync()
        self._on_change()
        return len(named)

    def _sync(self) -> None:
        """Usage records and series for exactly the configured names (and ``anonymous``)."""
        keys = {k.name: k for k in self.ring.by_sha256.values()}
        keys.setdefault(ANONYMOUS, OPEN)
        for name in list(self.usage):
            if name not in keys:
                del self.usage[name]
                if self._metrics is not None:
                    self._metrics.forget_key(name)
        for name, key in keys.items():
            usage = self.usage.get(name)
            if usage is None:
                usage = self.usage[name] = KeyUsage(key)
            usage.configure(key)

    # --- accounting --------------------------------------------------------------------------

    def usage_of(self, key: ClientKey) -> KeyUsage:
        """The usage of ``key``'s name; a key removed meanwhile gets a record of its own."""
        return self.usage.get(key.name) or KeyUsage(key)

    def admit(self, key: ClientKey) -> tuple[KeyUsage, Refusal | None]:
        """Count a model request against ``key``'s limits; a refusal says why it may not go."""
        usage = self.usage_of(key)
        refusal = usage.admit()
        metrics = self._metrics if usage is self.usage.get(key.name) else None
        if refusal is not None:
            if metrics is not None:
                metrics.of(metrics.key_limited, key.name, refusal.limit).inc()
            self._on_change()
        elif metrics is not None:
            metrics.of(metrics.key_requests, key.name).inc()
            metrics.of(metrics.key_active, key.name).inc()
        return usage, refusal

    def finished(self, usage: KeyUsage, tokens_in: int, tokens_out: int) -> None:
        """An admitted request ended, having used these tokens."""
        usage.finish(tokens_in, tokens_out)
        name = usage.key.name
        if self._metrics is not None and usage is self.usage.get(name):
            self._metrics.of(self._metrics.key_active, name).dec()
            self._metrics.of(self._metrics.key_tokens, name, "in").inc(tokens_in)
            self._metrics.of(self._metrics.key_tokens, name, "out").inc(tokens_out)

    def snapshot(self, queued: Mapping[str, int]) -> list[dict[str, Any]]:
        """Per key name, for ``/api/v1/state``: totals, requests in flight and queued, limits."""
        rows = []
        for name, usage in sorted(self.usage.items()):
            key = usage.key
            waiting = queued.get(name, 0)
            rows.append(
                {
                    "name": name,
                    "requests_total": usage.requests_total,
                    "tokens_in_total": usage.tokens_in_total,
                    "tokens_out_total": usage.tokens_out_total,
                    "in_flight": max(0, usage.active - waiting),
                    "queued": waiting,
                    "limited_total": usage.limited_total,
                    "daily_tokens_used": usage.day_tokens,
                    "limits": {
                        "rpm": key.rpm,
                        "tpm": key.tpm,
                        "max_concurrent": key.max_concurrent,
                        "daily_tokens": key.daily_tokens,
                    },
                    "models": list(key.models),
                    "weight": key.weight,
                    "priority": key.priority,
                    "disabled": key.disabled,
                    "expired": key.expired(),
                }
            )
        return rows


_Store = TypeVar("_Store", bound=KeysFile)


def watch_keys_file(
    keys: web.AppKey[_Store], interval: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` that calls the store's :meth:`~KeysFile.poll` every ``interval``."""

    async def watch(app: web.Application) -> AsyncIterator[None]:
        store = app[keys]
        task = asyncio.create_task(_poll(store, interval)) if store.path else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return watch


async def _poll(store: KeysFile, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            store.poll()
        except Exception:  # never let one odd file system error stop the watching
            log.exception("keys_file_watch_failed")
