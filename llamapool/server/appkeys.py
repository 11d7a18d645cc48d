"""Typed application state shared by the server's modules."""

from __future__ import annotations

from aiohttp import web

from llamapool.config import ServeConfig
from llamapool.log import Throttle
from llamapool.server.ends import Ends
from llamapool.server.keys import KeyStore
from llamapool.server.mcp_sessions import McpEndpoints
from llamapool.server.pool import Pool
from llamapool.server.registry import Registry
from llamapool.server.scheduler import Scheduler
from llamapool.server.state import PoolState
from llamapool.server.worker_keys import WorkerKeyStore

CONFIG = web.AppKey("config", ServeConfig)
POOL = web.AppKey("pool", Pool)
SOCKETS: web.AppKey[set[web.WebSocketResponse[bool]]] = web.AppKey("sockets")
STATE = web.AppKey("state", PoolState)
SCHEDULER = web.AppKey("scheduler", Scheduler)
REGISTRY = web.AppKey("registry", Registry)
#: The client keys in force (``API_KEY`` and ``KEYS_FILE``) and each key's usage.
KEYS = web.AppKey("keys", KeyStore)
#: The worker keys in force (``WORKER_KEY`` and ``WORKER_KEYS_FILE``) and who holds each.
WORKER_KEYS = web.AppKey("worker_keys", WorkerKeyStore)
#: One log line per kind of refusal and interval for what anyone can cause at will (a flood
#: of worker connections with a wrong key).
LOG_THROTTLE = web.AppKey("log_throttle", Throttle)
#: The gate every request passes before it ends (a bounded number per turn of the loop).
ENDS = web.AppKey("ends", Ends)
#: MCP endpoints, their relays and sessions (see :mod:`llamapool.server.mcp_sessions`).
MCP = web.AppKey("mcp", McpEndpoints)
