"""This server's part in a cluster: what it tells the other servers through Redis, and what it
learns from them.

Each server owns what it knows first hand, its own workers, and publishes it; nothing is
decided in Redis. In Redis (keys under ``llamapool:``), each server keeps:

- ``server:<id>``: its signed announcement (id, the URL its peers reach it at), which expires
  :data:`TTL` seconds after its last refresh (every :data:`REFRESH` s): a server killed
  outright leaves the cluster that long after, with its workers;
- ``workers:<id>``: a hash of its workers' entries (what they serve, their limit, their
  requests in flight and from which server, their state API entry), expiring with it;
- ``servers``: the set of server ids, pruned of those whose announcement expired.

Every change to a worker (joined, left, models, status, a request started or ended) is
written to the hash and published on ``events`` in one transaction; changes that happen in
the same turn of the event loop leave together, so a busy server publishes at most one
message per turn. The others apply it to their pool: a worker of another server is a
:class:`~llamapool.server.pool.WorkerHandle` with a :class:`~.peer.RemoteLink`, whose load
is the load its server reports from every other server, plus this server's own requests to
it as it counts them itself. Its server is the one judge of its limit (see :mod:`.peer`);
the others' counts are a fresh estimate, right within one message's delay.

Each entry carries its server's sequence number, so an update older than what a server knows
(a message delivered after a later full read) is ignored. When Redis is out of reach the
server keeps serving its own workers, forgets the others' (it cannot hear from them), says so
in ``/healthz``, the state API, the metrics and a warning, and retries; once back it
publishes everything it has and reads everything the others have: entries are whole states,
never increments, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from llamapool.log import Throttle
from llamapool.server.affinity import TTL as AFFINITY_TTL
from llamapool.server.affinity import Holder, ResponseAffinity
from llamapool.server.cluster.auth import ClusterAuth
from llamapool.server.cluster.peer import Peer, RemoteLink, client_session
from llamapool.server.cluster.usage import SHARE_INTERVAL, SharedUsage, day_key, today
from llamapool.server.keys import KeyStore
from llamapool.server.mcp_sessions import McpEndpoints
from llamapool.server.pool import Pool, WorkerHandle
from llamapool.server.registry import Registry
from llamapool.server.scheduler import Turn
from llamapool.server.state import PoolState

log = structlog.get_logger("llamapool.server")

PREFIX = "llamapool"
EVENTS = f"{PREFIX}:events"
SERVERS = f"{PREFIX}:servers"
#: Seconds a server's entries outlive its last refresh.
TTL = 3.0
#: Seconds between two refreshes (and checks of who else is there).
REFRESH = 1.0
#: Longest wait between two attempts to reach Redis again.
MAX_BACKOFF = 5.0
#: Seconds a cancelled task gets to end before it is cancelled again (see :func:`_cancel`).
RECANCEL = 0.5


def response_key(response_id: str) -> str:
    return f"{PREFIX}:response:{response_id}"


def server_key(server_id: str) -> str:
    return f"{PREFIX}:server:{server_id}"


def workers_key(server_id: str) -> str:
    return f"{PREFIX}:workers:{server_id}"


def redis_url(url: str) -> str:
    """``valkey://`` and ``valkeys://`` are Redis URLs under another name."""
    for alias, scheme in (("valkey://", "redis://"), ("valkeys://", "rediss://")):
        if url.startswith(alias):
            return scheme + url.removeprefix(alias)
    return url


@attrs.define(eq=False)
class _Remote:
    """A worker connected to another server, as this server knows it."""

    handle: WorkerHandle
    #: Its server's sequence number of the entry last applied.
    seq: int
    #: Its requests in flight from servers other than this one, as its server reported.
    others: int = 0
    #: Its state API entry.
    entry: dict[str, Any] = attrs.Factory(dict)


class Cluster:
    """Membership of one cluster: publish this server's workers, mirror the others'."""

    def __init__(
        self,
        url: str,
        cluster_keys: tuple[str, ...],
        *,
        pool: Pool,
        state: PoolState,
        registry: Registry,
        keys: KeyStore | None = None,
        ca_file: str = "",
        server_id: str = "",
    ) -> None:
        self.id = server_id or secrets.token_hex(6)
        self.auth = ClusterAuth(cluster_keys)
        self.url = redis_url(url)
        #: The URL the other servers reach this one at (set before :meth:`run`).
        self.advertise_url = ""
        self.pool = pool
        self.state = state
        self.registry = registry
        self.connected = False
        self.peers: dict[str, Peer] = {}
        self.remote: dict[str, _Remote] = {}
        #: Requests other servers sent to each local worker, in flight, by sending server.
        self.origins: dict[str, Counter[str]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._poke = asyncio.Event()
        self._seq = 0
        self._session = client_session(ca_file)
        #: Client keys' use, shared so that their limits hold over the cluster.
        self.usage = SharedUsage(keys, registry.scheduler) if keys is not None else None
        self._task: asyncio.Task[None] | None = None
        self._throttle = Throttle()
        #: For each other server, where its queue for each model stands.
        self._turns: dict[str, dict[str, Turn]] = {}
        self._queue_changed = False
        #: Where this server's queues stood when it last told the others (None: tell them).
        self._sent_turns: dict[str, Turn] | None = None
        #: Stored responses produced here, to tell the others (see :meth:`share_responses`).
        self._responses: dict[str, Holder] = {}
        #: This server's MCP endpoints (see :meth:`share_mcp`).
        self.mcp: McpEndpoints | None = None
        #: The Redis client while connected (for lookups made by requests).
        self._client: redis.Redis | None = None
        self.scheduler = registry.scheduler
        self.scheduler.elsewhere = self._elsewhere
        self.scheduler.on_queue = self._queued
        self._left = False
        #: Rounds of refresh done (each also checks who else is in the cluster).
        self.rounds = 0
        pool.on_load = self._loaded
        registry.announce = self.changed
        state.server_id = self.id
        state.cluster_view = self.view
        state.remote_workers = self.remote_entries
        self._metrics = state.metrics
        self._count()

    def _count(self) -> None:
        """The cluster's gauges: whether it is reached, its servers and its workers."""
        m = self._metrics
        m.cluster_connected.set(1 if self.connected else 0)
        m.cluster_servers.set(1 + len(self.peers))
        m.cluster_workers.set(len(self.pool))  # its own and the others' workers

    # --- what happens here ----------------------------------------------------------------

    def changed(self, worker: WorkerHandle) -> None:
        """A local worker joined, left or changed: publish it (with this turn's others)."""
        if not worker.server:
            if self.pool.get(worker.id) is worker:
                self._forget(worker.id)  # connected here now: what others said of it is stale
            self._dirty.add(worker.id)
            self._wake.set()
            self._count()

    def _queued(self) -> None:
        """This server's queues changed: tell the others which request it serves next."""
        self._queue_changed = True
        self._wake.set()

    def _elsewhere(self, model: str) -> list[Turn]:
        return [turns[model] for turns in self._turns.values() if model in turns]

    def share_mcp(self, endpoints: McpEndpoints) -> None:
        """This server's MCP endpoints are announced (each second), and its sessions' ids
        name it, so a request for an endpoint or a session held elsewhere finds its server
        (see :mod:`.mcp_proxy`)."""
        self.mcp = endpoints
        endpoints.session_prefix = f"{self.id}."
        self.state.mcp_view = self._mcp_view

    def _mcp_view(self) -> list[dict[str, Any]]:
        """``mcp_endpoints`` of the state: each endpoint of each server, with its server."""
        local = self.mcp.snapshot() if self.mcp is not None else []
        entries = [{**e, "server": self.id} for e in local]
        for peer in self.peers.values():
            entries += [{**e, "server": peer.id} for e in peer.mcp_entries]
        return sorted(entries, key=lambda e: (str(e["id"]), str(e["server"])))

    def mcp_server(self, endpoint_id: str, session_id: str) -> Peer | None:
        """The other server to send an MCP request to: the one whose session it is, or, with
        no session and no relay of the endpoint here, one that has the endpoint."""
        owner, dot, _ = session_id.partition(".")
        if dot:
            return self.peers.get(owner) if owner != self.id else None
        here = self.mcp is not None and self.mcp.endpoints.get(endpoint_id)
        if here and here.relays:
            return None
        holders = sorted(p.id for p in self.peers.values() if endpoint_id in p.mcp)
        return self.peers[holders[0]] if holders else None

    def share_responses(self, affinity: ResponseAffinity) -> None:
        """Which worker holds each stored Responses API response is kept in Redis too (for
        the affinity's time to live), so a follow-up reaching any server finds it."""
        affinity.on_remember = self._remembered
        affinity.lookup = self._holder

    def _remembered(self, response_id: str, holder: Holder) -> None:
        self._responses[response_id] = holder
        self._wake.set()

    async def _holder(self, response_id: str) -> Holder | None:
        client = self._client
        if client is None or not response_id.isprintable() or len(response_id) > 256:
            return None
        try:
            raw = await client.get(response_key(response_id))
        except (RedisError, OSError, asyncio.TimeoutError):
            return None
        entry = _loads(raw) if raw is not None else None
        if entry is None or not isinstance(entry.get("worker"), str):
            return None
        return Holder(entry["worker"], str(entry.get("model", "")))

    def _sent(self) -> None:
        self._metrics.of(self._metrics.cluster_requests, "out").inc()

    def _loaded(self, worker: WorkerHandle) -> None:
        if not worker.server:
            self._dirty.add(worker.id)
            self._wake.set()

    def forwarded(self, worker: WorkerHandle, origin: str, delta: int) -> None:
        """A request from server ``origin`` started (+1) or ended (-1) on a local worker."""
        if delta > 0:
            self._metrics.of(self._metrics.cluster_requests, "in").inc()
        counts = self.origins.setdefault(worker.id, Counter())
        counts[origin] += delta
        if counts[origin] <= 0:
            del counts[origin]
            if not counts:
                del self.origins[worker.id]
        self.changed(worker)

    def _entry(self, worker_id: str) -> dict[str, Any] | None:
        """What the cluster is told of a local worker; ``None``: it is not here (any more)."""
        worker = self.pool.get(worker_id)
        if worker is None or worker.server:
            return None
        entry = self.state.worker_entry(worker)
        if entry is None:
            return None
        return {
            "seq": self._seq,
            "id": worker.id,
            "name": worker.name,
            "models": sorted(worker.models),
            "paths": sorted(worker.paths) if worker.paths is not None else None,
            "max_concurrency": worker.max_concurrency,
            "protocol": worker.protocol,
            "ready": worker.ready,
            "draining": worker.draining,
            "inflight": worker.inflight,
            "origins": dict(self.origins.get(worker.id, {})),
            "state": entry,
        }

    # --- what the other servers say --------------------------------------------------------

    def _apply(self, server: str, worker_id: str, entry: dict[str, Any] | None, seq: int) -> None:
        held = self.pool.get(worker_id)
        if held is not None and not held.server:
            return  # connected here: this server knows it first hand
        known = self.remote.get(worker_id)
        if known is not None and known.handle.server == server and seq < known.seq:
            return  # older than what was applied already
        if entry is None:
            if known is not None and known.handle.server == server:
                self._forget(worker_id)
            return
        peer = self.peers.get(server)
        if peer is None:
            return
        fields = {
            "models": frozenset(entry["models"]),
            "paths": frozenset(entry["paths"]) if entry["paths"] is not None else None,
            "max_concurrency": max(1, int(entry["max_concurrency"])),
            "ready": bool(entry["ready"]),
            "draining": bool(entry["draining"]),
        }
        if known is None or known.handle.server != server:
            if known is not None:
                self._forget(worker_id)
            link = RemoteLink(peer, worker_id)
            handle = WorkerHandle(
                id=worker_id,
                name=str(entry["name"]),
                link=link,
                protocol=int(entry["protocol"]),
                server=server,
                **fields,  # type: ignore[arg-type]
            )
            link.on_busy = lambda: self._full(worker_id)
            known = self.remote[worker_id] = _Remote(handle, seq)
            self.registry.remote_join(handle)
            self._count()
        else:
            handle = known.handle
            changes = {k: v for k, v in fields.items() if getattr(handle, k) != v}
            if changes:
                self.registry.remote_update(handle, **changes)
        known.seq = seq
        known.entry = {**entry["state"], "server": server}
        others = max(0, int(entry["inflight"]) - int(entry["origins"].get(self.id, 0)))
        self._set_others(known, others)

    def _set_others(self, known: _Remote, others: int) -> None:
        handle = known.handle
        mine = handle.inflight - known.others
        known.others = others
        self.pool.set_inflight(handle, others + max(0, mine))
        self.registry.scheduler.dispatch()
        self.state.changed()

    def _full(self, worker_id: str) -> None:
        """Its server refused a request: the worker is full, whatever this server thought,
        until its server says otherwise."""
        known = self.remote.get(worker_id)
        if known is not None:  # full of others' requests: the refused one was not let in
            self._set_others(known, known.handle.max_concurrency)

    def _forget(self, worker_id: str) -> None:
        known = self.remote.pop(worker_id, None)
        if known is not None:
            self.registry.remote_leave(known.handle)
            self._count()

    def _drop(self, server: str, reason: str) -> None:
        """A server ``left``, ``expired`` or is out of reach (``disconnected``): forget it
        and its workers."""
        for worker_id, known in list(self.remote.items()):
            if known.handle.server == server:
                self._forget(worker_id)
        if self.usage is not None:
            self.usage.forget(server)
        self._turns.pop(server, None)
        if self.peers.pop(server, None) is not None:
            log.info("cluster_server_left", server=server, reason=reason)
            self._count()

    def _degrade(self) -> None:
        """Redis is out of reach: serve with the workers connected here only."""
        for server in list(self.peers):
            self._drop(server, "disconnected")
        if self.usage is not None:
            self.usage.forget_all()
        if self.connected:
            self.connected = False
            if not self._left:
                log.warning("cluster_disconnected", server=self.id)
        self._count()
        self.state.changed()

    # --- views ------------------------------------------------------------------------------

    def remote_entries(self) -> list[dict[str, Any]]:
        return [known.entry for known in self.remote.values() if known.entry]

    def view(self) -> dict[str, Any]:
        """The ``cluster`` section of the state document."""
        servers = [{"id": self.id, "url": self.advertise_url, "self": True}]
        servers += [{"id": p.id, "url": p.url, "self": False} for p in self.peers.values()]
        return {"server": self.id, "connected": self.connected, "servers": servers}

    # --- the Redis side ---------------------------------------------------------------------

    async def run(self) -> None:
        """Stay in the cluster until cancelled, through Redis outages."""
        backoff = 0.25
        warned = False
        while True:
            client = redis.Redis.from_url(
                self.url, socket_connect_timeout=2.0, socket_timeout=TTL, retry=None
            )
            try:
                await self._member(client)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                if self.connected or not warned:
                    log.warning(
                        "cluster_unreachable", server=self.id, error=str(exc) or type(exc).__name__
                    )
                    warned = True
                backoff = 0.25 if self.connected else min(backoff * 2, MAX_BACKOFF)
            except Exception:  # a bug must not end the membership for good: log, start over
                log.exception("cluster_failed", server=self.id)
                backoff = MAX_BACKOFF
            finally:
                self._degrade()
                await _quietly(client.aclose())
            await asyncio.sleep(backoff)

    async def _member(self, client: redis.Redis) -> None:
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(EVENTS)
            await self._announce(client, full=True)
            await self._refresh(client)
            self.connected = True
            self._client = client
            self._sent_turns = None
            self._queued()  # tell the others where this server's queues stand
            self._count()
            self.state.changed()
            log.info(
                "cluster_joined", server=self.id, url=self.advertise_url, peers=len(self.peers)
            )
            tasks = [
                asyncio.ensure_future(self._listen(pubsub)),
                asyncio.ensure_future(self._keep(client)),
                asyncio.ensure_future(self._publish(client)),
                asyncio.ensure_future(self._share(client)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                await _cancel(tasks)
        finally:
            self._client = None
            await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]

    async def _announce(self, client: redis.Redis, *, full: bool = False) -> None:
        """Refresh this server's announcement (and, ``full``, every worker entry)."""
        ms = int(TTL * 1000)
        mcp = self.mcp.snapshot() if self.mcp is not None else []
        payload = orjson.dumps({"id": self.id, "url": self.advertise_url, "mcp": mcp})
        signed = orjson.dumps({"server": payload.decode(), "sig": self.auth.sign(payload)})
        pipe = client.pipeline(transaction=True)
        pipe.set(server_key(self.id), signed, px=ms)
        pipe.sadd(SERVERS, self.id)
        if full:
            self._seq += 1
            entries = {
                w.id: orjson.dumps(e) for w in self.pool if (e := self._entry(w.id)) is not None
            }
            pipe.delete(workers_key(self.id))
            if entries:
                pipe.hset(workers_key(self.id), mapping=entries)  # type: ignore[arg-type]
        pipe.pexpire(workers_key(self.id), ms)
        await pipe.execute()

    async def _refresh(self, client: redis.Redis) -> None:
        """Who is in the cluster now: adopt new servers, drop the expired."""
        ids = sorted(_text(i) for i in await client.smembers(SERVERS))
        others = [i for i in ids if i != self.id]
        values = await client.mget([server_key(i) for i in others]) if others else []
        live: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        expired = []
        for server, value in zip(others, values, strict=False):
            announced = self._verified(server, value) if value is not None else None
            if announced is None:
                expired.append(server)
            else:
                live[server] = announced
        if expired:
            await client.srem(SERVERS, *expired)
        for server in list(self.peers):
            if server not in live:
                self._drop(server, "expired")
        for server, (url, mcp) in live.items():
            if server not in self.peers:
                await self._adopt(client, server, url)
            peer = self.peers[server]
            if peer.mcp_entries != mcp:
                peer.mcp_entries = mcp
                peer.mcp = frozenset(str(e["id"]) for e in mcp if e.get("relays"))
                self.state.changed()

    def _verified(self, server: str, value: bytes | str) -> tuple[str, list[dict[str, Any]]] | None:
        """The URL and the MCP endpoints in a server's announcement, if a member of this
        cluster signed it."""
        try:
            outer = orjson.loads(value)
            payload = outer["server"].encode()
            if not self.auth.verify(payload, str(outer["sig"])):
                raise ValueError("bad signature")
            inner = orjson.loads(payload)
            if inner["id"] != server or not str(inner["url"]).startswith(("http://", "https://")):
                raise ValueError("wrong id or URL")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("cluster_announcement_invalid", server=server[:64])
            return None
        mcp = [e for e in inner.get("mcp", ()) if isinstance(e, dict) and "id" in e]
        return str(inner["url"]), mcp

    async def _adopt(self, client: redis.Redis, server: str, url: str) -> None:
        self.peers[server] = Peer(server, url, self._session, self.auth, self.id, sent=self._sent)
        self._count()
        log.info("cluster_server_joined", server=server, url=url)
        entries = await client.hgetall(workers_key(server))
        for worker_id, raw in entries.items():
            entry = _loads(raw)
            if entry is not None:
                self._safely(server, self._apply_stored, server, _text(worker_id), entry)

    async def _keep(self, client: redis.Redis) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), REFRESH)
            self._poke.clear()
            await self._announce(client)
            await self._refresh(client)
            self.rounds += 1

    async def _publish(self, client: redis.Redis) -> None:
        """Write and publish the workers that changed, a turn's changes in one message."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            queue_changed, self._queue_changed = self._queue_changed, False
            responses, self._responses = self._responses, {}
            if responses:
                pipe = client.pipeline(transaction=False)
                for response_id, holder in responses.items():
                    value = orjson.dumps({"worker": holder.worker_id, "model": holder.model})
                    pipe.set(response_key(response_id), value, ex=int(AFFINITY_TTL))
                await pipe.execute()
            turns = self.scheduler.turns() if queue_changed else None
            if turns == self._sent_turns:
                turns = None  # the others know
            if not dirty and turns is None:
                continue
            self._seq += 1
            entries = {worker_id: self._entry(worker_id) for worker_id in dirty}
            present = {k: orjson.dumps(v) for k, v in entries.items() if v is not None}
            absent = [k for k, v in entries.items() if v is None]
            pipe = client.pipeline(transaction=True)
            if present:
                pipe.hset(workers_key(self.id), mapping=present)  # type: ignore[arg-type]
            if absent:
                pipe.hdel(workers_key(self.id), *absent)
            pipe.pexpire(workers_key(self.id), int(TTL * 1000))
            message: dict[str, Any] = {"server": self.id, "seq": self._seq, "workers": entries}
            if turns is not None:
                message["turns"] = {
                    model: attrs.astuple(turn, recurse=False) for model, turn in turns.items()
                }
                self._sent_turns = turns
            pipe.publish(EVENTS, orjson.dumps(message))
            await pipe.execute()

    async def _share(self, client: redis.Redis) -> None:
        """Every :data:`SHARE_INTERVAL`, tell the others how this server used the keys, and
        count the daily budgets in Redis."""
        usage = self.usage
        if usage is None:
            return
        while True:
            await asyncio.sleep(SHARE_INTERVAL)
            news = usage.report()
            lanes = usage.lanes()
            budgets = usage.budgets()
            if not news and lanes is None and not budgets:
                continue
            day = today()
            pipe = client.pipeline(transaction=False)
            for name in budgets:
                key = day_key(PREFIX, name, day)
                pipe.incrby(key, news[name][1] if name in news else 0)
                pipe.expire(key, 2 * 86400)
            if news or lanes is not None:
                message: dict[str, Any] = {"server": self.id, "usage": news}
                if lanes is not None:
                    message["queued"] = lanes
                pipe.publish(EVENTS, orjson.dumps(message))
            results = await pipe.execute()
            totals = results[0 : 2 * len(budgets) : 2]
            usage.day_totals(dict(zip(budgets, totals, strict=True)), day)

    async def _listen(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=REFRESH)
            if message is None:
                continue
            data = _loads(message["data"])
            if data is None:
                continue
            server = str(data.get("server", ""))
            if server == self.id:
                continue
            if data.get("bye"):
                self._drop(server, "left")
                continue
            if server not in self.peers:
                self._poke.set()  # a server new to this one: read it whole now
                continue
            self._safely(server, self._take, server, data)

    def _take(self, server: str, data: dict[str, Any]) -> None:
        """A message of a known server: its keys' use, or its workers that changed."""
        if "usage" in data:
            if self.usage is not None:
                self.usage.absorb(server, dict(data["usage"]))
                if "queued" in data:
                    self.usage.absorb_lanes(server, dict(data["queued"]))
            return
        seq = int(data.get("seq", 0))
        if "turns" in data:
            self._turns[server] = {str(m): _turn(t) for m, t in dict(data["turns"]).items()}
        for worker_id, entry in dict(data.get("workers") or {}).items():
            self._apply(server, str(worker_id), entry, seq)
        if "turns" in data:
            # A server this one deferred to may have none waiting now; and what it served
            # may move this server's next turn, which the others are then told.
            self.scheduler.dispatch()
            self._queued()

    def _apply_stored(self, server: str, worker_id: str, entry: dict[str, Any]) -> None:
        self._apply(server, worker_id, entry, int(entry.get("seq", 0)))

    def _safely(self, server: str, apply: Callable[..., None], *args: Any) -> None:
        """Apply what a server published; one malformed message (Redis is shared; anything
        may write there) is logged and skipped, never the end of the membership."""
        try:
            apply(*args)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._throttle.log(
                log.warning,
                "cluster_message_invalid",
                reason=type(exc).__name__,
                server=server[:64],
            )

    def start(self, advertise_url: str) -> None:
        """Join, once the server listens, as ``advertise_url`` for the others."""
        self.advertise_url = advertise_url
        self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        """Leave the cluster at once (a server stopping): the others stop sending requests
        here; those in flight finish. Once only."""
        if self._task is None or self._left:
            return
        self._left = True
        await _cancel([self._task])
        await self._leave()

    async def _leave(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            pipe = client.pipeline(transaction=True)
            pipe.delete(server_key(self.id), workers_key(self.id))
            pipe.srem(SERVERS, self.id)
            pipe.publish(EVENTS, orjson.dumps({"server": self.id, "bye": True}))
            await pipe.execute()
        except (RedisError, OSError, asyncio.TimeoutError):
            pass  # its entries expire on their own
        finally:
            await _quietly(client.aclose())

    async def close(self) -> None:
        await self._session.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _turn(value: Any) -> Turn:
    """A turn as another server published it: ``[start, arrived, vtime, {key: finish}]``."""
    start, arrived, vtime, finish = value
    return Turn(
        float(start),
        float(arrived),
        float(vtime),
        {str(name): float(tag) for name, tag in dict(finish).items()},
    )


def _loads(raw: bytes | str) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


async def _quietly(closing: Awaitable[Any]) -> None:
    """Close a Redis client or subscription to the end, even if cancelled meanwhile (then
    re-raise): one cancelled halfway would leave its socket to the garbage collector."""

    async def close() -> None:
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await closing

    task = asyncio.ensure_future(close())
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again each that goes on.

    Once is not always enough: on Python 3.11, ``asyncio.wait_for`` (which redis-py sends every
    command through, given a socket timeout) swallows a cancellation that comes just as what
    it waits for is done, and the task runs on, so a server would never finish stopping. If
    the task awaiting this is cancelled meanwhile, it still waits for them, then raises.
    """
    cancelled = False
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=RECANCEL)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
