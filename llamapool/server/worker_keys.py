"""The worker keys in force, which connected worker holds which, and cutting off revoked ones.

:class:`WorkerKeyStore` is the one owner of the worker keys: it reads ``WORKER_KEY`` and
``WORKER_KEYS_FILE`` (reloaded like ``KEYS_FILE``: on SIGHUP and when it changes), answers which
key a worker presented, holds one :class:`Grant` per connected worker or MCP relay (so
``max_workers`` counts both and a revocation reaches both), and narrows what a worker
advertises to its key's ``models``.
A key removed, disabled or expired disconnects its workers at once with 1008 ``unauthorized``,
which tells a worker to stop rather than retry. No aiohttp here: the worker socket passes in how
to disconnect its worker.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs
import structlog

from llamapool.log import Throttle
from llamapool.protocol import CLOSE_KEY_FULL, CLOSE_POLICY, REASON_UNAUTHORIZED
from llamapool.server.keyfile import (
    ANONYMOUS,
    OPEN_WORKER,
    WorkerKey,
    digest,
    read_worker_keys_file,
)
from llamapool.server.keys import KeysFile
from llamapool.server.pool import WorkerHandle

log = structlog.get_logger("llamapool.server")

#: Disconnects a worker: a WebSocket close code and reason.
Revoke = Callable[[int, str], None]


class Holder(Protocol):
    """What holds a worker key while connected: a worker, or an MCP relay."""

    id: str
    credential: str


class Socket(Protocol):
    """The connection of a holder, as far as this module closes it (aiohttp's WebSocket)."""

    def close(self, *, code: int, message: bytes) -> Awaitable[Any]: ...


@attrs.define(eq=False)
class Grant:
    """A connected worker's (or MCP relay's) hold on its key."""

    key: WorkerKey
    holder: Holder
    revoke: Revoke = attrs.field(repr=False)
    #: What the worker last advertised, before its key's ``models`` narrowed it.
    advertised: frozenset[str] = frozenset()
    #: What of that its key refused (logged when it changes).
    refused: frozenset[str] = frozenset()
    #: The close of its socket on revocation, for the connection to await as it ends.
    closing: list[asyncio.Future[Any]] = attrs.Factory(list)


class WorkerKeyStore(KeysFile):
    """The accepted worker keys and the workers connected with each."""

    RELOADED = "worker_keys_reloaded"
    INVALID = "worker_keys_file_invalid"

    def __init__(self, plain: tuple[str, ...] = (), path: str = "") -> None:
        super().__init__(path)
        self.plain = plain
        #: Whether workers need a key: any WORKER_KEY, or a WORKER_KEYS_FILE (even an empty one).
        self.required = bool(plain or path)
        #: Told when a connected worker's key now allows other models: the worker and what it
        #: advertised (the registry narrows it again, see :meth:`permit`).
        self.on_models_changed: Callable[[WorkerHandle, frozenset[str]], None] = _ignore
        self._grants: dict[Holder, Grant] = {}
        self._by_name: dict[str, set[Grant]] = {}
        self._next_expiry = math.inf
        self._by_sha256: dict[bytes, WorkerKey] = {}
        self._use(read_worker_keys_file(path) if path else ())

    def _use(self, named: Iterable[WorkerKey]) -> None:
        by_sha256 = {digest(k): WorkerKey(ANONYMOUS, digest(k)) for k in self.plain}
        for key in named:
            by_sha256.setdefault(key.sha256, key)
        self._by_sha256 = by_sha256
        self._next_expiry = min(
            (k.expires for k in by_sha256.values() if k.expires is not None), default=math.inf
        )

    @property
    def names(self) -> frozenset[str]:
        return frozenset(k.name for k in self._by_sha256.values())

    def authenticate(self, presented: str) -> WorkerKey | None:
        """The key a worker presented, if it may connect (hashed and looked up, as for client
        keys: constant time in what is compared, O(1) in the keys)."""
        if not self.required:
            return OPEN_WORKER
        key = self._by_sha256.get(digest(presented))
        return key if key is not None and key.valid() else None

    # --- connected workers -------------------------------------------------------------------

    def grant(self, key: WorkerKey, holder: Holder, revoke: Revoke) -> Grant | None:
        """Let a worker or an MCP relay hold ``key`` while it is connected; ``None`` if the
        key's ``max_workers`` are connected (a new connection of one of them does not count
        twice)."""
        held = self._by_name.setdefault(key.name, set())
        if key.max_workers is not None:
            others = {g.holder.id for g in held} - {holder.id}
            if len(others) >= key.max_workers:
                return None
        grant = Grant(key, holder, revoke)
        holder.credential = key.name
        held.add(grant)
        self._grants[holder] = grant
        return grant

    async def hold(
        self,
        key: WorkerKey,
        holder: Holder,
        socket: Socket,
        *,
        leave: Callable[[], object],
        throttle: Throttle,
        event: str,
    ) -> Grant | None:
        """:meth:`grant` for a connection: revoking the key calls ``leave`` (no new work from
        that instant) and closes ``socket`` with 1008 ``unauthorized``. When the key's
        ``max_workers`` are connected, ``socket`` is closed with 4003 and a reason (logged as
        ``event``, once per reason and interval) and ``None`` is returned."""

        closing: list[asyncio.Future[Any]] = []

        def revoke(code: int, reason: str) -> None:
            leave()
            closing.append(asyncio.ensure_future(socket.close(code=code, message=reason.encode())))

        grant = self.grant(key, holder, revoke)
        if grant is None:
            throttle.log(log.warning, event, reason="max_workers", credential=key.name)
            await socket.close(code=CLOSE_KEY_FULL, message=max_workers_reached(key).encode()[:120])
            return None
        grant.closing = closing
        return grant

    def release(self, grant: Grant) -> None:
        """The worker's connection ended (a second call does nothing)."""
        if self._grants.get(grant.holder) is grant:
            del self._grants[grant.holder]
        held = self._by_name.get(grant.key.name)
        if held is not None:
            held.discard(grant)
            if not held:
                del self._by_name[grant.key.name]

    def connected(self, name: str) -> int:
        """How many workers hold the key named ``name``."""
        return len(self._by_name.get(name, ()))

    def permit(self, worker: WorkerHandle, models: Iterable[str]) -> frozenset[str]:
        """The models of ``models`` the worker's key lets it serve; the others are refused (and
        logged when what is refused changes)."""
        models = frozenset(models)
        grant = self._grants.get(worker)
        if grant is None:
            return models
        grant.advertised = models
        allowed = frozenset(m for m in models if grant.key.allows(m))
        refused = models - allowed
        if refused and refused != grant.refused:
            log.warning(
                "worker_models_refused",
                worker_id=worker.id,
                credential=grant.key.name,
                models=sorted(refused)[:20],
                refused=len(refused),
                hint="not in the models of its worker key",
            )
        grant.refused = refused
        return allowed

    # --- reloading and expiry ----------------------------------------------------------------

    def _load(self) -> int:
        named = read_worker_keys_file(self.path)
        self._use(named)
        for grant in list(self._grants.values()):
            key = self._by_sha256.get(grant.key.sha256)
            if key is None:
                self._revoke(grant, "removed")
            elif not key.valid():
                self._revoke(grant, "disabled" if key.disabled else "expired")
            else:
                rules_changed = key.models != grant.key.models
                self._rekey(grant, key)
                if rules_changed and isinstance(grant.holder, WorkerHandle):
                    self.on_models_changed(grant.holder, grant.advertised)
        return len(named)

    def poll(self) -> None:
        """Reload if the file changed, and disconnect the workers of keys that expired."""
        super().poll()
        self.expire()

    def expire(self, now: float | None = None) -> None:
        """Disconnect the workers of every key expired by ``now`` (cheap until one is due)."""
        now = time.time() if now is None else now
        if now < self._next_expiry:
            return
        for grant in list(self._grants.values()):
            if grant.key.expired(now):
                self._revoke(grant, "expired")
        self._next_expiry = min(
            (
                k.expires
                for k in self._by_sha256.values()
                if k.expires is not None and k.expires > now
            ),
            default=math.inf,
        )

    def _rekey(self, grant: Grant, key: WorkerKey) -> None:
        if key.name != grant.key.name:  # renamed: the same key under a new name
            self.release(grant)
            grant.key = key
            self._by_name.setdefault(key.name, set()).add(grant)
            self._grants[grant.holder] = grant
            grant.holder.credential = key.name
        grant.key = key

    def _revoke(self, grant: Grant, why: str) -> None:
        self.release(grant)
        log.warning(
            "worker_key_revoked",
            worker_id=grant.holder.id,
            credential=grant.key.name,
            reason=why,
        )
        grant.revoke(CLOSE_POLICY, REASON_UNAUTHORIZED)


def max_workers_reached(key: WorkerKey) -> str:
    """Why one more worker (or MCP relay) of ``key`` is refused (its close reason)."""
    return f"worker key {key.name!r} has its max_workers ({key.max_workers}) connected"


def _ignore(worker: WorkerHandle, models: frozenset[str]) -> None:
    return None
