"""Typed application state shared by the server's modules."""

from __future__ import annotations

from aiohttp import web

from llamapool.config import ServeConfig
from llamapool.server.pool import Pool
from llamapool.server.scheduler import Scheduler
from llamapool.server.state import PoolState

CONFIG = web.AppKey("config", ServeConfig)
POOL = web.AppKey("pool", Pool)
SOCKETS: web.AppKey[set[web.WebSocketResponse[bool]]] = web.AppKey("sockets")
STATE = web.AppKey("state", PoolState)
SCHEDULER = web.AppKey("scheduler", Scheduler)
#: Client requests being handled now (a one-element list: a mutable counter).
ACTIVE_REQUESTS: web.AppKey[list[int]] = web.AppKey("active_requests")
