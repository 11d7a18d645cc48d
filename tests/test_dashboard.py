"""The live dashboard: served without a key, driven in headless Chromium against a real pool.

The browser tests skip when Chromium is not installed. Set ``LLAMAPOOL_SCREENSHOTS`` to a folder
to keep a PNG of each browser test's page as it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from llamapool.backends.demo import DemoBackend
from llamapool.build import build_info
from llamapool.config import WorkConfig
from llamapool.mcp.agent import McpRelay
from llamapool.mcp.config import McpConfig
from llamapool.mcp.stdio import StdioTransport
from llamapool.plugin_api import BackendSettings
from llamapool.server.app import DASHBOARD
from llamapool.worker.agent import Agent

from .cdp import Browser, Chromium, Page, find_chromium
from .conftest import API_KEY, WORKER_KEY, PoolServer, wait_for
from .tcp_proxy import tcp_proxy

HOSTILE_NAME = "<img src=x onerror=alert(1)>"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One headless Chromium for the session; yields its DevTools URL and is killed at the end."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    browser = Chromium(binary, tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield browser.devtools_url()
    finally:
        browser.stop()


@pytest.fixture
async def page(chromium: str, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh tab with its own storage, closed after the test."""
    browser = await Browser.connect(chromium)
    try:
        tab = await browser.new_page()
        try:
            yield tab
            folder = os.environ.get("LLAMAPOOL_SCREENSHOTS")
            if folder:
                png = await tab.screenshot()
                await asyncio.to_thread(Path(folder, f"{request.node.name}.png").write_bytes, png)
        finally:
            await tab.close()
    finally:
        await browser.close()


@pytest.fixture
async def dashboard(pool_server: PoolServer, page: Page) -> Page:
    """The dashboard of ``pool_server``, unlocked with the API key and live."""
    await page.navigate(pool_server.url + "/dashboard/")
    await page.wait_for(VISIBLE_AUTH_FORM, what="the API key form")
    await submit_key(page, API_KEY)
    await page.wait_for(f"{CONNECTION_STATE} === 'live'", what="the stream to go live")
    return page


# --- helpers ---------------------------------------------------------------------------------

CONNECTION_STATE = "document.getElementById('connection').dataset.state"
VISIBLE_AUTH_FORM = "!document.getElementById('auth').hidden"


def text_of(selector: str) -> str:
    """JavaScript: the text of the first element matching ``selector``, or null."""
    return f"(document.querySelector({json.dumps(selector)})?.textContent ?? null)"


def worker_row(worker_id: str) -> str:
    """CSS: the table row of one worker."""
    return f'#workers tr[data-worker-id="{worker_id}"]'


def worker_cell(worker_id: str, field: str) -> str:
    """CSS: one cell (``data-field``) of a worker's row."""
    return f'{worker_row(worker_id)} [data-field="{field}"]'


async def submit_key(page: Page, key: str) -> None:
    """Type ``key`` into the dashboard's form and submit it, as a person would."""
    await page.evaluate(
        f"""(() => {{
            document.getElementById('api-key').value = {json.dumps(key)};
            document.getElementById('auth').requestSubmit();
        }})()"""
    )


@contextlib.asynccontextmanager
async def running_worker(server: PoolServer, name: str) -> AsyncIterator[Agent]:
    """A demo worker that leaves the pool (its socket closes) when the block ends."""
    cfg = WorkConfig(server_url=server.ws_url, worker_key=WORKER_KEY, worker_name=name)
    agent = Agent(cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(
            lambda: agent.registered.is_set() or task.done(), timeout=10, what="registration"
        )
        if task.done():
            task.result()  # the worker's own error
        yield agent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_relay(server: PoolServer, mcp_id: str, name: str) -> AsyncIterator[McpRelay]:
    """An in-process ``llamapool mcp`` relay for ``tests/mcp_server.py`` over stdio."""
    script = str(Path(__file__).parent / "mcp_server.py")
    cfg = McpConfig(
        server_url=server.ws_url,
        worker_key=WORKER_KEY,
        mcp_id=mcp_id,
        name=name,
        command=(sys.executable, script),
        token="t0ken",
    )
    relay = McpRelay(cfg, StdioTransport(cfg.command))
    task = asyncio.create_task(relay.run())
    try:
        await wait_for(
            lambda: relay.registered.is_set() or task.done(), timeout=10, what="registration"
        )
        if task.done():
            task.result()  # the relay's own error
        yield relay
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- served files (no browser) ---------------------------------------------------------------


async def test_root_redirects_to_dashboard(pool_server: PoolServer) -> None:
    """``/`` (for a browser) and ``/dashboard`` redirect to ``/dashboard/``."""
    async with aiohttp.ClientSession() as http:
        locations = []
        for path in ("/", "/dashboard"):
            resp = await http.get(
                pool_server.url + path, allow_redirects=False, headers={"Accept": "text/html"}
            )
            locations.append((resp.status, resp.headers.get("Location")))
    assert [(302, "/dashboard/"), (302, "/dashboard/")] == locations


async def test_page_and_assets_need_no_key(pool_server: PoolServer) -> None:
    """The page, its script and its stylesheet are served without an API key."""
    async with aiohttp.ClientSession() as http:
        served = {}
        for path in (
            "/dashboard/",
            "/dashboard/assets/dashboard.js",
            "/dashboard/assets/dashboard.css",
        ):
            resp = await http.get(pool_server.url + path)
            served[path] = (resp.status, resp.content_type.rpartition("/")[2])
    assert {
        "/dashboard/": (200, "html"),
        "/dashboard/assets/dashboard.js": (200, "javascript"),
        "/dashboard/assets/dashboard.css": (200, "css"),
    } == served


def test_dashboard_is_self_contained() -> None:
    """The shipped files load nothing from other origins and never write HTML from data."""
    files = {p.name: p.read_text() for p in DASHBOARD.iterdir() if p.is_file()}
    offending = [
        (name, needle)
        for name, text in files.items()
        for needle in (
            "http://",
            "https://",
            "//cdn",
            "@import",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        )
        if needle in text
    ]
    assert {"index.html", "dashboard.css", "dashboard.js"} == set(files)
    assert [] == offending


# --- in the browser --------------------------------------------------------------------------


async def test_key_form_unlocks_the_stream(pool_server: PoolServer, page: Page) -> None:
    """Without a key the page asks for one; a wrong key is refused, the right one goes live."""
    await page.navigate(pool_server.url + "/")
    await page.wait_for(VISIBLE_AUTH_FORM, what="the API key form")
    assert "/dashboard/" == await page.evaluate("location.pathname")
    assert "auth" == await page.evaluate(CONNECTION_STATE)

    await submit_key(page, "not-the-key")
    await page.wait_for("!document.getElementById('auth-error').hidden", what="a refusal")
    assert "The server did not accept that key." == await page.evaluate(text_of("#auth-error"))

    await submit_key(page, API_KEY)
    await page.wait_for(f"{CONNECTION_STATE} === 'live'", what="the stream to go live")
    assert {
        "form_hidden": True,
        "stored": API_KEY,
        "url_has_key": False,
        "version": f"v{build_info().version}",
        "workers": "0",
    } == await page.evaluate(
        f"""({{
            form_hidden: document.getElementById('auth').hidden,
            stored: sessionStorage.getItem('llamapool.apiKey'),
            url_has_key: location.href.includes({json.dumps(API_KEY)}),
            version: {text_of('[data-field="version"]')},
            workers: {text_of('[data-field="workers-connected"]')},
        }})"""
    )


async def test_key_survives_a_reload(dashboard: Page) -> None:
    """The key kept in sessionStorage reconnects a reloaded tab without asking again."""
    await dashboard.send("Page.reload")
    await dashboard.wait_for("document.readyState === 'complete'")
    state = await dashboard.wait_for(
        f"['live', 'auth'].includes({CONNECTION_STATE}) && {CONNECTION_STATE}"
    )
    assert "live" == state


async def test_forget_key_asks_again(dashboard: Page) -> None:
    """The Forget key button drops the stored key and shows the key form again."""
    await dashboard.evaluate("document.getElementById('forget-key').click()")
    await dashboard.wait_for(VISIBLE_AUTH_FORM, what="the API key form")
    assert {"stored": None, "state": "auth", "button_hidden": True} == await dashboard.evaluate(
        f"""({{
            stored: sessionStorage.getItem('llamapool.apiKey'),
            state: {CONNECTION_STATE},
            button_hidden: document.getElementById('forget-key').hidden,
        }})"""
    )


async def test_no_form_when_the_server_has_no_key(
    start_server: Callable[..., Awaitable[PoolServer]], page: Page
) -> None:
    """A server without API keys is watched at once, without the key form."""
    server = await start_server(api_keys="")
    await page.navigate(server.url + "/dashboard/")
    await page.wait_for(f"{CONNECTION_STATE} === 'live'", what="the stream to go live")
    assert True is await page.evaluate("document.getElementById('auth').hidden")


async def test_worker_row_appears(
    pool_server: PoolServer, dashboard: Page, start_worker: Callable[..., Awaitable[Agent]]
) -> None:
    """A worker that joins shows up live with its name, status, load, models and counters."""
    agent = await start_worker(pool_server, "demo", worker_name="gpu-box-1", max_concurrency=4)
    wid = agent.cfg.worker_id
    await dashboard.wait_for(f"!!document.querySelector({json.dumps(worker_row(wid))})")
    fields = ("status", "load", "models", "processed", "failures", "tokens")
    cells = await dashboard.evaluate(
        "({"
        + ", ".join(f"{f!r}: {text_of(worker_cell(wid, f))}" for f in fields)
        + f", name: {text_of(worker_row(wid) + ' .worker-name')}"
        + "})"
    )
    assert {
        "name": "gpu-box-1",
        "status": "idle",
        "load": "0 / 4",
        "models": "demo",
        "processed": "0",
        "failures": "0",
        "tokens": "0 / 0",
    } == cells
    heartbeat = await dashboard.evaluate(text_of(worker_cell(wid, "heartbeat")))
    assert re.fullmatch(r"\d+s ago", heartbeat) is not None
    assert ["1", "1"] == await dashboard.evaluate(
        f"[{text_of('[data-field=workers-connected]')}, "
        f"{text_of('#models tr[data-model=demo] [data-field=workers]')}]"
    )


async def test_worker_that_leaves_is_shown_gone(pool_server: PoolServer, dashboard: Page) -> None:
    """When a worker's connection closes, its row stays, marked gone."""
    async with running_worker(pool_server, "leaving-box") as agent:
        wid = agent.cfg.worker_id
        status = text_of(worker_cell(wid, "status"))
        await dashboard.wait_for(f"{status} === 'idle'", what="the worker's row")
    await dashboard.wait_for(f"{status} === 'gone'", what="the row to turn gone")
    assert {"row": "gone", "gone": "1", "online": "0"} == await dashboard.evaluate(
        f"""({{
            row: document.querySelector({json.dumps(worker_row(wid))}).dataset.status,
            gone: {text_of('[data-field="workers-gone"]')},
            online: {text_of('[data-field="workers-connected"]')},
        }})"""
    )


async def test_worker_text_is_never_html(
    pool_server: PoolServer, dashboard: Page, start_worker: Callable[..., Awaitable[Agent]]
) -> None:
    """A worker name made of HTML is shown as that text; no element is created from it."""
    await dashboard.evaluate("window.alert = () => { window.alerted = true; }")
    agent = await start_worker(pool_server, "demo", worker_name=HOSTILE_NAME)
    name = f"{worker_row(agent.cfg.worker_id)} .worker-name"
    await dashboard.wait_for(f"!!document.querySelector({json.dumps(name)})", what="the row")
    assert {"name": HOSTILE_NAME, "images": 0, "alerted": False} == await dashboard.evaluate(
        f"""({{
            name: {text_of(name)},
            images: document.querySelectorAll('img').length,
            alerted: window.alerted === true,
        }})"""
    )


async def test_stream_parser_handles_split_events(pool_server: PoolServer, page: Page) -> None:
    """The page's SSE parser joins events split across reads and multi-line data, skips comments."""
    await page.navigate(pool_server.url + "/dashboard/")
    parsed = await page.evaluate(
        """(() => {
            const events = [], comments = [];
            const parser = new window.llamapool.SSEParser(
                (e) => events.push([e.type, e.data]), (c) => comments.push(c));
            for (const piece of [': ping\\r\\n\\r\\ndata: {"a"', ':1}\\r', '\\n\\r\\n',
                                 'data: one\\ndata: two\\n\\nevent: other\\nda', 'ta: x\\n',
                                 '\\ndata: incomplete']) {
                parser.push(piece);
            }
            return {events, comments};
        })()"""
    )
    assert {
        "events": [["message", '{"a":1}'], ["message", "one\ntwo"], ["other", "x"]],
        "comments": [" ping"],
    } == parsed


async def test_dropped_stream_reconnects(pool_server: PoolServer, page: Page) -> None:
    """When the stream drops the page says so and keeps retrying; it goes live once it can."""
    port = pool_server.server.port
    assert port is not None
    async with tcp_proxy(port) as cable:
        await page.navigate(cable.url + "/dashboard/")
        await page.wait_for(VISIBLE_AUTH_FORM, what="the API key form")
        await submit_key(page, API_KEY)
        await page.wait_for(f"{CONNECTION_STATE} === 'live'", what="the stream to go live")

        cable.cut(until_mended=True)
        await page.wait_for(f"{CONNECTION_STATE} === 'reconnecting'", what="the indicator")
        assert "Disconnected" == await page.evaluate(text_of("#connection .label"))

        cable.mend()
        await page.wait_for(f"{CONNECTION_STATE} === 'live'", what="the stream to come back")
        assert True is await page.evaluate("document.getElementById('auth').hidden")


async def test_mcp_endpoint_panel(pool_server: PoolServer, dashboard: Page) -> None:
    """An MCP endpoint shows up live with its relay (its name only as text) and sessions."""
    await dashboard.evaluate("window.alert = () => { window.alerted = true; }")
    row = "#mcp tr[data-mcp-id=files]"
    sessions = text_of(f"{row} [data-field=sessions]")
    calls = text_of(f"{row} [data-field=calls]")
    assert True is await dashboard.evaluate("!document.getElementById('mcp-empty').hidden")
    async with running_relay(pool_server, "files", HOSTILE_NAME):
        await dashboard.wait_for(f"{sessions} === '0'", what="the endpoint's row")
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "dashboard-test", "version": "0"},
            },
        }
        headers = {"Authorization": f"Bearer {API_KEY}", "X-MCP-Token": "t0ken"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.post(pool_server.url + "/api/mcp/id/files", json=init) as response,
        ):
            assert 200 == response.status
        settled = f"{sessions} === '1' && {calls} === '0'"
        await dashboard.wait_for(settled, what="the session, its initialize answered")
        assert {
            "id": "files",
            "token": "token",
            "relay": HOSTILE_NAME,
            "total": "1 endpoint",
            "images": 0,
            "alerted": False,
        } == await dashboard.evaluate(
            f"""({{
                id: {text_of(f"{row} [data-field=id] .chip")},
                token: {text_of(f"{row} .mcp-token")},
                relay: {text_of(f"{row} .mcp-relay")},
                total: {text_of('[data-field="mcp-total"]')},
                images: document.querySelectorAll('img').length,
                alerted: window.alerted === true,
            }})"""
        )
    await dashboard.wait_for(
        "!document.getElementById('mcp-empty').hidden", what="the endpoint to leave"
    )


async def test_client_key_panel(
    pool_server: PoolServer, dashboard: Page, start_worker: Callable[..., Awaitable[Agent]]
) -> None:
    """Each client key that sent requests shows by name (never the key) with its requests and
    tokens, live."""
    await start_worker(pool_server, "demo")
    body = {"model": "demo", "messages": [{"role": "user", "content": "count me"}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for _ in range(2):
            async with http.post(pool_server.url + "/v1/chat/completions", json=body) as resp:
                assert 200 == resp.status
    row = "#keys tr[data-key=anonymous]"
    await dashboard.wait_for(
        f"{text_of(f'{row} [data-field=requests]')} === '2'", what="the key's two requests"
    )

    assert {
        "name": "anonymous",
        "tokens": "4 / 6",
        "inflight": "0",
        "total": "1 key",
        "secret": False,
    } == await dashboard.evaluate(
        f"""({{
            name: {text_of(f"{row} [data-field=name]")},
            tokens: {text_of(f"{row} [data-field=tokens]")},
            inflight: {text_of(f"{row} [data-field=inflight]")},
            total: {text_of('[data-field="keys-total"]')},
            secret: document.body.textContent.includes({json.dumps(API_KEY)}),
        }})"""
    )
