"""Authentication: keys compared in constant time, several keys at once for rotation, keys that
never leak (logs, state, metrics, error bodies, the worker's /status), a warning when a server
beyond loopback has no key, and exactly which routes are open without one."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from llamapool.cli import resolve
from llamapool.config import DEFAULT_WS_PATH, ServeConfig, WorkConfig
from llamapool.errors import ConfigError
from llamapool.log import configure_logging, reset_logging
from llamapool.run import _warn_if_open, running_server
from llamapool.server import middleware, workers
from llamapool.server.app import create_app
from llamapool.server.keyfile import KeyRing, digest
from llamapool.server.worker_keys import WorkerKeyStore
from llamapool.testing import create_fake_ollama_app, serve_app
from llamapool.worker.status import serving_status

from .cli_helpers import cli_env, cli_process, ws_url
from .conftest import PoolServer, StartServer, StartWorker, url_of

MODEL = "llama3:8b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
#: Distinctive secrets, so a leak anywhere is found by a substring search.
CLIENT_KEYS = ("sk-client-old-7c1d", "sk-client-new-9e2f")
WORKER_KEYS = ("wk-worker-old-3a8b", "wk-worker-new-5d6c")
BACKEND_KEY = "bk-backend-4f0a"
PRESENTED = "sk-presented-by-a-stranger-1b2c"
SECRETS = (*CLIENT_KEYS, *WORKER_KEYS, BACKEND_KEY, PRESENTED)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def leaked(text: str | bytes) -> list[str]:
    """The secrets found in ``text``."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return [secret for secret in SECRETS if secret in text]


async def status_of(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def chat_status(http: aiohttp.ClientSession, server: PoolServer, key: str) -> int:
    """POST a chat for the demo model with ``key``; its status."""
    body = {**CHAT, "model": "demo"}
    async with http.post(server.url + "/api/chat", json=body, headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


# --- constant-time comparison ---------------------------------------------------------------


def test_workers_and_clients_are_checked_by_sha256() -> None:
    """The worker socket and the client middleware look up the SHA-256 of the presented key
    (WorkerKeyStore.authenticate, KeyRing.lookup), never comparing raw values."""
    assert "keys.authenticate(" in inspect.getsource(workers._admit)
    assert "self._by_sha256.get(digest(presented))" in inspect.getsource(
        WorkerKeyStore.authenticate
    )
    assert "keys.authenticate(" in inspect.getsource(middleware.client_auth)
    assert "self.by_sha256.get(digest(presented))" in inspect.getsource(KeyRing.lookup)
    assert "hashlib.sha256(" in inspect.getsource(digest)


async def test_a_key_that_is_not_utf8_is_refused_with_401(pool_server: PoolServer) -> None:
    """An Authorization header with bytes that are not UTF-8 gets a 401, not a 500."""
    reader, writer = await asyncio.open_connection(pool_server.server.host, pool_server.server.port)
    writer.write(
        b"GET /v1/models HTTP/1.1\r\nHost: pool\r\nAuthorization: Bearer \xff\xfe-key\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert "invalid_api_key" == orjson.loads(body)["error"]["code"]


# --- several keys, rotation -----------------------------------------------------------------


async def test_each_of_several_client_and_worker_keys_works(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """With comma-separated API and worker keys, every key opens the API and registers."""
    server = await start_server(api_keys=",".join(CLIENT_KEYS), worker_keys=",".join(WORKER_KEYS))
    agents = [await start_worker(server, "demo", worker_key=key) for key in WORKER_KEYS]

    async with aiohttp.ClientSession() as http:
        statuses = [
            await status_of(http, server.url + "/v1/models", bearer(key)) for key in CLIENT_KEYS
        ]

    assert [200, 200] == statuses
    assert {a.cfg.worker_id for a in agents} == {w.id for w in server.pool}


async def test_keys_rotate_without_downtime(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """A server with "old,new" keys accepts both; restarted with "new" only, it refuses the
    old client key and the old worker key, and still accepts the new ones."""
    both = await start_server(api_keys=",".join(CLIENT_KEYS), worker_keys=",".join(WORKER_KEYS))
    await start_worker(both, "demo", worker_key=WORKER_KEYS[0])
    async with aiohttp.ClientSession() as http:
        during = [await chat_status(http, both, key) for key in CLIENT_KEYS]

    new_only = await start_server(api_keys=CLIENT_KEYS[1], worker_keys=WORKER_KEYS[1])
    with pytest.raises(ConfigError, match="unauthorized"):
        await start_worker(new_only, "demo", worker_key=WORKER_KEYS[0])
    await start_worker(new_only, "demo", worker_key=WORKER_KEYS[1])
    async with aiohttp.ClientSession() as http:
        after = [await chat_status(http, new_only, key) for key in CLIENT_KEYS]

    assert ([200, 200], [401, 200]) == (during, after)
    assert 1 == len(new_only.pool)


def test_the_cli_reads_keys_from_a_list_and_a_file(tmp_path: Path) -> None:
    """--api-key and --api-key-file (one key a line, # comments) add up; so do worker keys."""
    api_file, worker_file = tmp_path / "api-keys", tmp_path / "worker-keys"
    api_file.write_text(f"# rotated in March\n{CLIENT_KEYS[1]}\n\n")
    worker_file.write_text(f"{WORKER_KEYS[0]}\n{WORKER_KEYS[1]}\n")

    settings = resolve(
        [
            "serve",
            "--api-key",
            f" {CLIENT_KEYS[0]} , {CLIENT_KEYS[1]}",
            "--api-key-file",
            str(api_file),
            "--worker-key-file",
            str(worker_file),
        ]
    )

    assert isinstance(settings.config, ServeConfig)
    assert (CLIENT_KEYS, WORKER_KEYS) == (settings.config.api_keys, settings.config.worker_keys)


# --- keys never leak ------------------------------------------------------------------------


def test_configs_do_not_show_their_keys() -> None:
    """The repr of a server or worker configuration leaves every key out."""
    serve = ServeConfig(api_keys=",".join(CLIENT_KEYS), worker_keys=",".join(WORKER_KEYS))
    work = WorkConfig(worker_key=WORKER_KEYS[0], backend_api_key=BACKEND_KEY)

    assert [] == leaked(repr(serve) + repr(work))


async def test_keys_never_reach_logs_state_metrics_or_error_bodies(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """Through good and bad client keys, a refused worker and a served request, no key shows
    in a log event, the state API, /metrics, or a 401 body (which never echoes the key)."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], api_key=BACKEND_KEY))
    with capture_logs() as logs:
        server = await start_server(
            api_keys=",".join(CLIENT_KEYS), worker_keys=",".join(WORKER_KEYS)
        )
        await start_worker(
            server,
            "ollama",
            backend_url=url_of(backend),
            backend_api_key=BACKEND_KEY,
            worker_key=WORKER_KEYS[0],
        )
        with pytest.raises(ConfigError):
            await start_worker(server, "demo", worker_key=PRESENTED)
        statuses, bodies = [], []
        async with aiohttp.ClientSession() as http:
            for method, path, key in [
                ("POST", "/api/chat", CLIENT_KEYS[0]),
                ("POST", "/api/chat", PRESENTED),
                ("POST", "/v1/chat/completions", PRESENTED),
                ("GET", "/api/v1/state", PRESENTED),
                ("GET", "/api/v1/state", CLIENT_KEYS[1]),
                ("GET", "/metrics", CLIENT_KEYS[1]),
                ("GET", "/v1/models", CLIENT_KEYS[1]),
                ("GET", "/api/tags", CLIENT_KEYS[1]),
            ]:
                headers = bearer(key)
                async with http.request(method, server.url + path, json=CHAT, headers=headers) as r:
                    statuses.append(r.status)
                    bodies.append(await r.read())

    assert [200, 401, 401, 401, 200, 200, 200, 200] == statuses
    assert "echo: hi" == orjson.loads(bodies[0])["message"]["content"]
    assert [] == leaked(b"".join(bodies))
    assert [] == leaked(repr(logs))
    assert any(e["event"] == "worker_rejected" for e in logs)


async def test_the_workers_status_shows_no_key(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The worker's /status, /version and /metrics show neither its worker key nor its
    backend key."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], api_key=BACKEND_KEY))
    agent = await start_worker(
        pool_server,
        "ollama",
        backend_url=url_of(backend),
        backend_api_key=BACKEND_KEY,
        status_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
    )
    worker_key = agent.cfg.worker_key

    async with serving_status(agent) as urls, aiohttp.ClientSession() as http:
        bodies = []
        for url in (urls[0] + "/status", urls[0] + "/version", urls[0] + "/metrics"):
            async with http.get(url) as resp:
                assert 200 == resp.status
                bodies.append(await resp.text())

    assert True is orjson.loads(bodies[0])["connected_to_server"]
    assert [] == leaked("".join(bodies))
    assert worker_key not in "".join(bodies)


async def test_keys_never_reach_the_cli_logs() -> None:
    """``serve`` and ``work`` at debug level, with good and bad keys in play, print no key
    on stderr, and the refused worker's error line names no key either."""
    async with serve_app(create_fake_ollama_app(models=[MODEL], api_key=BACKEND_KEY)) as backend:
        server_env = cli_env(
            API_KEY=",".join(CLIENT_KEYS), WORKER_KEY=",".join(WORKER_KEYS), LOG_LEVEL="debug"
        )
        async with cli_process("serve", "--host", "127.0.0.1", "--port", "0", env=server_env) as s:
            url = str((await s.event("server_listening"))["url"])
            worker_env = cli_env(
                SERVER_URL=ws_url(url),
                WORKER_KEY=WORKER_KEYS[1],
                BACKEND="ollama",
                BACKEND_URL=backend,
                BACKEND_API_KEY=BACKEND_KEY,
                LOG_LEVEL="debug",
            )
            refused_env = {**worker_env, "WORKER_KEY": PRESENTED}
            async with (
                cli_process("work", env=worker_env) as worker,
                cli_process("work", env=refused_env) as refused,
            ):
                await worker.event("worker_registered")
                assert 1 == await refused.wait()
                async with aiohttp.ClientSession() as http:
                    for key in (CLIENT_KEYS[0], PRESENTED):
                        async with http.post(
                            url + "/api/chat", json=CHAT, headers=bearer(key)
                        ) as resp:
                            await resp.read()
                    assert 401 == resp.status
                await s.wait_until(
                    lambda: sum(e.get("event") == "request_done" for e in s.events) >= 1,
                    what="the served request's log line",
                )
                assert 0 == await worker.stop()
            assert 0 == await s.stop()

    output = "\n".join(p.stderr + p.stdout for p in (s, worker, refused))
    assert "the server rejected this worker" in refused.stderr
    assert [] == leaked(output)


# --- a server open to the network without keys ----------------------------------------------


@pytest.mark.parametrize(
    ("host", "api_keys", "worker_keys", "expected"),
    [
        ("0.0.0.0", "", "", ["no_api_key", "no_worker_key"]),
        ("0.0.0.0", "k", "", ["no_worker_key"]),
        ("0.0.0.0", "", "k", ["no_api_key"]),
        ("0.0.0.0", "k", "k", []),
        ("::", "", "", ["no_api_key", "no_worker_key"]),
        ("192.0.2.7", "", "", ["no_api_key", "no_worker_key"]),
        ("pool.example.com", "", "", ["no_api_key", "no_worker_key"]),
        ("127.0.0.1", "", "", []),
        ("::1", "", "", []),
        ("localhost", "", "", []),
    ],
)
def test_a_server_beyond_loopback_without_keys_warns(
    host: str, api_keys: str, worker_keys: str, expected: list[str]
) -> None:
    """Listening beyond loopback with no API key or no worker key logs a warning for each
    missing key, with a hint that says who can get in; loopback never warns.

    The check is called directly: the tests never listen beyond loopback.
    """
    cfg = ServeConfig(host=host, api_keys=api_keys, worker_keys=worker_keys)

    with capture_logs() as logs:
        _warn_if_open(cfg)

    assert expected == [e["event"] for e in logs]
    assert all(e["log_level"] == "warning" and "anyone" in e["hint"] for e in logs)


async def test_a_loopback_server_without_keys_starts_without_a_warning() -> None:
    """running_server on 127.0.0.1 without keys logs server_listening and no key warning."""
    with capture_logs() as logs:
        async with running_server(ServeConfig(host="127.0.0.1", port=0)):
            pass

    events = [e["event"] for e in logs]
    assert "server_listening" in events
    assert [] == [e for e in events if e in ("no_api_key", "no_worker_key")]


# --- which routes are open ------------------------------------------------------------------

#: Everything that answers without a key: probes, the dashboard's static page, the worker door.
OPEN = {
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/",
    "/api/version",  # open on Ollama, which clients probe before sending a key
    "/dashboard",
    "/dashboard/",
    "/dashboard/assets/{name}",
    DEFAULT_WS_PATH,
}


def protected_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the app outside :data:`OPEN` and the static assets."""
    app = create_app(ServeConfig(host="127.0.0.1", port=0, api_keys="k"))
    routes = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or isinstance(resource, web.StaticResource):
            continue
        path = resource.canonical.replace("{id}", "some/model:tag")
        if route.method != "HEAD" and resource.canonical not in OPEN:
            routes.append((route.method, path))
    return routes


async def test_every_route_but_health_metrics_and_the_dashboard_page_needs_the_key(
    pool_server: PoolServer,
) -> None:
    """Without a key, every route of the app answers 401 except the open ones (/healthz,
    /metrics, the dashboard page and its assets, the worker socket)."""
    routes = protected_routes()
    async with aiohttp.ClientSession() as http:
        refused = []
        for method, path in routes:
            async with http.request(method, pool_server.url + path, json={}) as resp:
                await resp.read()
                refused.append((method, path, resp.status))
        open_statuses = {
            path: await status_of(http, pool_server.url + path, {})
            for path in ("/healthz", "/metrics", "/dashboard/", "/dashboard/assets/dashboard.js")
        }

    assert len(routes) >= 10
    assert [] == [r for r in refused if r[2] != 401]
    assert {
        "/healthz": 200,
        "/metrics": 200,
        "/dashboard/": 200,
        "/dashboard/assets/dashboard.js": 200,
    } == open_statuses


async def test_the_dashboard_page_is_open_but_its_data_needs_the_key(
    pool_server: PoolServer,
) -> None:
    """/dashboard/ loads without a key; the state it shows (/api/v1/state and its stream)
    needs the key."""
    async with aiohttp.ClientSession() as http:
        async with http.get(pool_server.url + "/dashboard/") as page:
            html = await page.text()
        without = [
            await status_of(http, pool_server.url + p, {})
            for p in ("/api/v1/state", "/api/v1/state/stream")
        ]
        async with http.get(pool_server.url + "/api/v1/state", headers=pool_server.auth) as r:
            state = await r.json()

    assert (200, "text/html") == (page.status, page.content_type)
    assert "<html" in html.lower()
    assert [401, 401] == without
    assert "workers" in state


@pytest.mark.parametrize("separate_port", [False, True], ids=["same-port", "metrics-port"])
async def test_metrics_can_require_the_key(separate_port: bool) -> None:
    """With metrics_require_key, /metrics answers 401 without the key and 200 with it, on the
    main port or on its own --metrics-port; /healthz stays open."""
    cfg = ServeConfig(
        host="127.0.0.1",
        port=0,
        api_keys=CLIENT_KEYS[0],
        metrics_require_key=True,
        metrics_port=0 if separate_port else None,
    )
    with capture_logs() as logs:
        async with running_server(cfg) as url, aiohttp.ClientSession() as http:
            metrics = url + "/metrics"
            if separate_port:
                metrics = next(e["url"] for e in logs if e["event"] == "metrics_listening")
            statuses = [
                await status_of(http, metrics, {}),
                await status_of(http, metrics, bearer(PRESENTED)),
                await status_of(http, metrics, bearer(CLIENT_KEYS[0])),
                await status_of(http, url + "/healthz", {}),
            ]

    assert [401, 401, 200, 200] == statuses


async def test_metrics_and_healthz_are_open_by_default(pool_server: PoolServer) -> None:
    """Without metrics_require_key, /metrics and /healthz answer without a key."""
    async with aiohttp.ClientSession() as http:
        statuses = [
            await status_of(http, pool_server.url + path, {}) for path in ("/metrics", "/healthz")
        ]

    assert [200, 200] == statuses


def test_console_tracebacks_show_no_local_variables(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception logged on the console shows its traceback but not the frames' local
    variables, where a key may sit."""
    log = structlog.get_logger("llamapool.test")
    secret = "-".join(("sk", "runtime", "secret"))  # never spelled out in this source

    def failing(keys: tuple[str, ...]) -> None:
        raise ValueError(f"{len(keys)} keys")

    configure_logging(fmt="console")
    try:
        try:
            failing((secret,))
        except ValueError:
            log.exception("request_failed")
    finally:
        reset_logging()

    err = capsys.readouterr().err
    assert "request_failed" in err
    assert "ValueError" in err
    assert secret not in err
