"""The access log: one ``http_request`` line for every request the server handles, those it
refuses itself included, naming the key (never its value) and never logging a query string."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from llamapool import cli

from .conftest import PoolServer, StartServer, wait_for
from .keys_helpers import bearer, captured_events, chat, raw_worker, write_keys

ALICE = "sk-alice-0123456789"
KEYS = f"keys:\n  - name: alice\n    key: {ALICE}\n    rpm: 1\n"


def access_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The access lines of client requests (not of worker connections)."""
    return [e for e in events if e["event"] == "http_request" and e["path"] != "/workers/connect"]


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with http.request(method, url, **kwargs) as resp:
        await resp.read()
        return resp.status


async def keyed(start_server: StartServer, tmp_path: Path, **settings: Any) -> PoolServer:
    path = write_keys(tmp_path / "keys.yaml", KEYS)
    return await start_server(keys_file=str(path), **settings)


async def test_every_answer_gets_one_line_with_the_key_name(
    start_server: StartServer, tmp_path: Path
) -> None:
    """200, 401, 404, 413, 429 and 503 answers each get one line with method, path, status,
    duration, bytes, request id, client address and key name; no key, no query string."""
    server = await keyed(start_server, tmp_path, max_body_size=1024, queue_size=0)
    url = server.url
    alice = bearer(ALICE)
    with captured_events() as events:
        async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
            held = asyncio.create_task(
                status_of(http, "POST", url + "/v1/chat/completions", json=chat("a"), headers=alice)
            )
            request = await worker.next()
            anonymous = bearer("test-api-key")
            statuses = [
                await status_of(http, "GET", url + f"/v1/models?key={ALICE}", headers=alice),
                await status_of(http, "GET", url + "/v1/models"),
                await status_of(http, "GET", url + "/v1/nothing", headers=alice),
                await status_of(
                    http, "POST", url + "/api/chat", data=b"x" * 2048, headers=anonymous
                ),
                await status_of(http, "POST", url + "/api/chat", json=chat("b"), headers=alice),
                await status_of(http, "POST", url + "/api/chat", json=chat("c"), headers=anonymous),
            ]
            await worker.answer(request)
            statuses.append(await held)
            await wait_for(lambda: 7 == len(access_lines(events)), what="7 access lines")

    lines = access_lines(events)
    by_status = {e["status"]: e for e in lines}
    assert [200, 401, 404, 413, 429, 503, 200] == statuses
    assert [200, 401, 404, 413, 429, 503, 200] == [e["status"] for e in lines]
    assert ("GET", "/v1/models", "alice", "127.0.0.1") == (
        lines[0]["method"],
        lines[0]["path"],
        lines[0]["client"],
        lines[0]["remote"],
    )
    assert [None, "alice", "anonymous", "alice", "anonymous"] == [
        by_status[s]["client"] for s in (401, 404, 413, 429, 503)
    ]
    assert all(isinstance(e["duration_ms"], float) and e["bytes"] > 0 for e in lines)
    assert all(len(e["request_id"]) == 32 for e in lines)
    (done,) = [e for e in events if e["event"] == "request_done"]
    assert ("alice", lines[-1]["request_id"]) == (done["client"], done["request_id"])
    assert ALICE not in repr(events)


async def test_the_access_log_can_be_turned_off(
    start_server: StartServer, pool_server: PoolServer
) -> None:
    """With access_log off, requests leave no http_request line."""
    server = await start_server(access_log=False)
    with captured_events() as events:
        async with aiohttp.ClientSession() as http:
            await status_of(http, "GET", server.url + "/v1/models")
            await status_of(http, "GET", pool_server.url + "/v1/models")

    assert [401] == [e["status"] for e in access_lines(events)]


def test_access_log_off_from_the_environment_and_the_flag(monkeypatch: Any) -> None:
    """ACCESS_LOG=off and --no-access-log both turn the access log off; it is on by default."""
    monkeypatch.delenv("ACCESS_LOG", raising=False)
    default = cli.resolve(["serve"]).config.access_log
    flagged = cli.resolve(["serve", "--no-access-log"]).config.access_log
    monkeypatch.setenv("ACCESS_LOG", "off")
    from_env = cli.resolve(["serve"]).config.access_log

    assert (True, False, False) == (default, flagged, from_env)
