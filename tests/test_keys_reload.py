"""The keys file is reloaded when it changes and on SIGHUP, without a restart and without
dropping requests; a bad file is reported with its line and the keys in force stay."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from llamapool.server.appkeys import KEYS
from llamapool.server.keys import KeyStore

from .cli_helpers import running_server
from .conftest import StartServer, wait_for
from .keys_helpers import bearer, chat, post, raw_worker, write_keys

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"


def one_key(name: str, key: str) -> str:
    return f"keys:\n  - name: {name}\n    key: {key}\n"


async def models_status(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.get(url + "/v1/models", headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


async def test_a_changed_file_applies_at_once_and_requests_in_flight_finish(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Replacing a key in the file takes effect within the poll interval; the old key's request
    in flight still completes; a broken file is logged with its line and changes nothing."""
    path = write_keys(tmp_path / "keys.yaml", one_key("alice", ALICE))
    server = await start_server(keys_file=str(path), keys_poll_interval=0.05)
    store = server.server.app[KEYS]
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        in_flight = asyncio.create_task(post(http, server, ALICE, chat("long")))
        request = await worker.next()
        write_keys(path, one_key("bob", BOB))
        await wait_for(lambda: "bob" in store.ring.names, what="the new keys")
        await worker.answer(request)
        finished = await in_flight
        statuses = [await models_status(http, server.url, k) for k in (ALICE, BOB)]
        with capture_logs() as events:
            write_keys(path, one_key("bob", BOB) + "  - name: [broken\n")
            await wait_for(
                lambda: any(e["event"] == "keys_file_invalid" for e in events), what="the error"
            )
        still = await models_status(http, server.url, BOB)

    (invalid,) = [e for e in events if e["event"] == "keys_file_invalid"]
    assert 200 == finished[0]
    assert [401, 200] == statuses
    assert invalid["error"].startswith(f"{path}:5: invalid YAML")
    assert 200 == still


async def test_sighup_reloads_the_keys_file(tmp_path: Path) -> None:
    """``llamapool serve`` reads KEYS_FILE again on SIGHUP and keeps serving."""
    path = write_keys(tmp_path / "keys.yaml", one_key("alice", ALICE))
    async with (
        running_server(KEYS_FILE=str(path), KEYS_POLL_INTERVAL="1h") as (server, url),
        aiohttp.ClientSession() as http,
    ):
        before = [await models_status(http, url, k) for k in (ALICE, BOB)]
        write_keys(path, one_key("alice", ALICE) + one_key("bob", BOB)[6:])
        server.proc.send_signal(signal.SIGHUP)
        reloaded = await server.event("keys_reloaded")
        after = [await models_status(http, url, k) for k in (ALICE, BOB)]
        assert None is server.proc.returncode

    assert [200, 401] == before
    assert (str(path), 2) == (reloaded["path"], reloaded["keys"])
    assert [200, 200] == after


@pytest.mark.parametrize(
    "entry",
    ["    expires: 2026-13-45\n", "    rpm: 99999999999999999999999999\n"],
    ids=["no-such-date", "rpm-past-64-bits"],
)
def test_a_reloaded_value_out_of_range_keeps_the_keys_in_force(tmp_path: Path, entry: str) -> None:
    """A date that does not exist or a limit past 64 bits, arriving by reload, is one
    ``keys_file_invalid`` event naming its line, and the keys in force stay."""
    path = write_keys(tmp_path / "keys.yaml", one_key("alice", ALICE))
    store = KeyStore(path=str(path))
    write_keys(path, one_key("bob", BOB) + entry)
    with capture_logs() as events:
        reloaded = store.reload()

    assert False is reloaded
    assert ["keys_file_invalid"] == [e["event"] for e in events]
    assert events[0]["error"].startswith(f"{path}:4: ")
    assert {"alice"} == store.ring.names
