"""Named client keys: the keys file, who may use which model, and OpenAI-style limits with
their 429s and headers, over real HTTP and the official ``openai`` client."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from llamapool.errors import ConfigError
from llamapool.server.keyfile import ANONYMOUS, parse_keys, read_keys_file
from llamapool.server.limits import duration

from .conftest import API_KEY, PoolServer, StartServer
from .keys_helpers import (
    MODEL,
    bearer,
    chat,
    post,
    raw_worker,
    sdk,
    until_queued,
    write_keys,
)

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"

KEYS = f"""\
keys:
  - name: alice
    key: {ALICE}
  - name: bob
    key_sha256: {hashlib.sha256(BOB.encode()).hexdigest()}
    models: ["other*"]
  - name: off
    key: sk-off-0123456789
    disabled: true
  - name: old
    key: sk-old-0123456789
    expires: 2001-01-01
"""


async def keyed_server(start_server: StartServer, tmp_path: Path, text: str) -> PoolServer:
    return await start_server(keys_file=str(write_keys(tmp_path / "keys.yaml", text)))


# --- the file -------------------------------------------------------------------------------


def test_a_keys_file_reads_every_field() -> None:
    """Every field of an entry is read; the key is kept only as its SHA-256."""
    (key,) = parse_keys(
        "keys:\n"
        "  - name: app\n"
        "    key: sk-app-0123456789\n"
        "    models: [llama3*, 'qwen:7b']\n"
        "    rpm: 60\n    tpm: 1000\n    max_concurrent: 2\n    daily_tokens: 5000\n"
        "    weight: 3\n    priority: -1\n    expires: 2030-01-31T12:00:00Z\n"
        "    disabled: false\n",
        source="k.yaml",
    )

    assert (
        "app",
        hashlib.sha256(b"sk-app-0123456789").digest(),
        ("llama3*", "qwen:7b"),
        (60, 1000, 2, 5000),
        (3.0, -1, 1896091200.0, False),
    ) == (
        key.name,
        key.sha256,
        key.models,
        (key.rpm, key.tpm, key.max_concurrent, key.daily_tokens),
        (key.weight, key.priority, key.expires, key.disabled),
    )
    assert (True, True, False) == (
        key.allows("llama3:8b"),
        key.allows("qwen:7b"),
        key.allows("qwen:14b"),
    )


A = "keys:\n  - name: a\n    key: sk-0123456789\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (A + "    rpn: 3\n", "k.yaml:4: unknown field 'rpn' (did you mean rpm?)"),
        (A + A[6:], "k.yaml:4: name 'a' is used twice (first on line 2)"),
        (
            A + A[6:].replace(" a", " b"),
            "k.yaml:4: key 'b' has the same value as the key on line 2",
        ),
        (A + "    rpm: -1\n", "k.yaml:4: 'rpm' must be a whole number from 1 to"),
        ("keys:\n  - name: a\n", "k.yaml:2: key 'a' needs exactly one of key, key_sha256"),
        (A.replace(" a", " anonymous"), "k.yaml:2: 'anonymous' is reserved for API_KEY keys"),
        (A + "    models: [unclosed\n", "k.yaml:5: invalid YAML"),
        ("clients: []\n", "k.yaml:1: unknown setting 'clients'"),
        (A + "    expires: 2026-13-45\n", "k.yaml:4: 'expires' must be a date or time"),
        (A + "    expires: 2026-02-30 10:00:00\n", "k.yaml:4: 'expires' must be a date or time"),
        (A + "    rpm: 1000000000001\n", "k.yaml:4: 'rpm' must be a whole number from 1 to"),
        (A + "    daily_tokens: 99999999999999999999999999\n", "k.yaml:4: 'daily_tokens' must"),
        (A + "    weight: .inf\n", "k.yaml:4: 'weight' must be a number from 0.001 to 1000"),
        (A + "    weight: .nan\n", "k.yaml:4: 'weight' must be a number from 0.001 to 1000"),
        (A + "    priority: 10000001\n", "k.yaml:4: 'priority' must be a whole number from"),
    ],
    ids=[
        "typo",
        "name-twice",
        "value-twice",
        "negative",
        "no-key",
        "reserved",
        "yaml",
        "top",
        "no-such-date",
        "no-such-time",
        "rpm-too-large",
        "tokens-past-64-bits",
        "weight-inf",
        "weight-nan",
        "priority-too-large",
    ],
)
def test_a_bad_keys_file_names_the_file_and_line(text: str, error: str) -> None:
    """Each mistake is one ConfigError that starts with the file and the line."""
    with pytest.raises(ConfigError) as caught:
        parse_keys(text, source="k.yaml")

    assert str(caught.value).startswith(error), str(caught.value)


def test_a_missing_keys_file_is_a_config_error(tmp_path: Path) -> None:
    """A KEYS_FILE that does not exist is reported by name."""
    with pytest.raises(ConfigError, match="no such file"):
        read_keys_file(tmp_path / "missing.yaml")


def test_reset_durations_read_like_openais() -> None:
    """Reset headers read like OpenAI's: milliseconds, seconds, minutes and seconds."""
    assert ["20ms", "1s", "2s", "6m0s", "1h0m1s"] == [
        duration(s) for s in (0.02, 1, 1.2, 360, 3601)
    ]


# --- who may do what ------------------------------------------------------------------------


async def test_named_disabled_expired_and_plain_keys(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Named keys and API_KEY both open the API; a disabled or expired key, or an unknown
    one, gets 401 in the API's shape."""
    server = await keyed_server(start_server, tmp_path, KEYS)
    keys = [ALICE, BOB, API_KEY, "sk-off-0123456789", "sk-old-0123456789", "sk-nobody-123"]

    async with aiohttp.ClientSession() as http:
        statuses = []
        for key in keys:
            async with http.get(server.url + "/v1/models", headers=bearer(key)) as resp:
                statuses.append((resp.status, (await resp.json()).get("error", {}).get("message")))

    assert [
        (200, None),
        (200, None),
        (200, None),
        (401, "API key 'off' is disabled"),
        (401, "API key 'old' is expired"),
        (401, "missing or invalid API key (send Authorization: Bearer <API_KEY>)"),
    ] == statuses


async def test_a_key_sees_and_uses_only_its_models(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A key limited to some models does not see others in /v1/models or /api/tags, and
    asking for one gets 404 model_not_found, as for a model nobody serves."""
    server = await keyed_server(start_server, tmp_path, KEYS)
    async with (
        raw_worker(server, auto=True, models=(MODEL, "other-1")),
        sdk(server, BOB) as bob,
        sdk(server, ALICE) as alice,
    ):
        bob_models = [m.id async for m in bob.models.list()]
        alice_models = [m.id async for m in alice.models.list()]
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "/api/tags", headers=bearer(BOB)) as resp:
                tags = [m["name"] for m in (await resp.json())["models"]]
            async with http.get(server.url + "/v1/models/m", headers=bearer(BOB)) as resp:
                one = resp.status
        with pytest.raises(openai.NotFoundError) as refused:
            await bob.chat.completions.create(model=MODEL, messages=[chat("hi")["messages"][0]])
        allowed = await bob.chat.completions.create(
            model="other-1", messages=[chat("hi")["messages"][0]]
        )

    assert (["other-1"], ["m", "other-1"], ["other-1"], 404) == (
        bob_models,
        alice_models,
        tags,
        one,
    )
    assert "model_not_found" == refused.value.code
    assert "ok" == allowed.choices[0].message.content


# --- limits ---------------------------------------------------------------------------------


async def test_rpm_answers_429_with_openais_shape_and_headers(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Past its requests per minute a key gets OpenAI's 429 (rate_limit_exceeded,
    Retry-After), and every answer carries the x-ratelimit-*-requests headers."""
    server = await keyed_server(
        start_server, tmp_path, f"keys:\n  - name: app\n    key: {ALICE}\n    rpm: 2\n"
    )
    messages = chat("hi")["messages"]
    async with raw_worker(server, auto=True), sdk(server, ALICE) as client:
        answers = [
            await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
            for _ in range(2)
        ]
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=MODEL, messages=messages)
        listing = await client.models.with_raw_response.list()

    headers = refused.value.response.headers
    assert [("2", "1"), ("2", "0")] == [
        (a.headers["x-ratelimit-limit-requests"], a.headers["x-ratelimit-remaining-requests"])
        for a in answers
    ]
    assert re.fullmatch(r"1m0s|59s", answers[1].headers["x-ratelimit-reset-requests"])
    assert ("rate_limit_exceeded", "0") == (
        refused.value.code,
        headers["x-ratelimit-remaining-requests"],
    )
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert "0" == listing.headers["x-ratelimit-remaining-requests"]


async def test_tpm_counts_the_reported_usage(start_server: StartServer, tmp_path: Path) -> None:
    """The tokens a response reports are charged to its key: past its tokens per minute the
    next request gets 429 with the x-ratelimit-*-tokens headers."""
    server = await keyed_server(
        start_server, tmp_path, f"keys:\n  - name: app\n    key: {ALICE}\n    tpm: 60\n"
    )
    messages = chat("hi")["messages"]
    async with raw_worker(server, auto=True), sdk(server, ALICE) as client:
        first = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages
        )
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=MODEL, messages=messages)

    headers = refused.value.response.headers
    assert ("60", "60") == (
        first.headers["x-ratelimit-limit-tokens"],
        first.headers["x-ratelimit-remaining-tokens"],
    )
    assert ("rate_limit_exceeded", "0") == (
        refused.value.code,
        headers["x-ratelimit-remaining-tokens"],
    )
    assert "rate limit reached for key 'app': 60 tokens per minute" in refused.value.message


async def test_a_spent_daily_budget_is_insufficient_quota(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A key whose daily token budget is spent gets 429 insufficient_quota until midnight UTC;
    Anthropic's and Ollama's routes answer in their own shapes."""
    server = await keyed_server(
        start_server, tmp_path, f"keys:\n  - name: app\n    key: {ALICE}\n    daily_tokens: 100\n"
    )
    async with (
        raw_worker(server, auto=True),
        aiohttp.ClientSession() as http,
        sdk(server, ALICE) as client,
    ):
        await client.chat.completions.create(model=MODEL, messages=chat("hi")["messages"])
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=MODEL, messages=chat("hi")["messages"])
        anthropic = await post(
            http, server, ALICE, {**chat("hi"), "max_tokens": 5}, path="/v1/messages"
        )
        ollama = await post(http, server, ALICE, chat("hi"), path="/api/chat")

    assert "insufficient_quota" == refused.value.code
    assert int(refused.value.response.headers["Retry-After"]) <= 86400
    assert (429, {"type": "error", "error": {"type": "rate_limit_error", "message": _spent()}}) == (
        anthropic[0],
        anthropic[2],
    )
    assert (429, {"error": _spent()}) == (ollama[0], ollama[2])


def _spent() -> str:
    return "key 'app' has used its 100 tokens for today (UTC)"


async def test_max_concurrent_counts_queued_and_running_requests(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A key at its max_concurrent gets 429 at once; when one of its requests ends, the next
    one goes through."""
    server = await keyed_server(
        start_server, tmp_path, f"keys:\n  - name: app\n    key: {ALICE}\n    max_concurrent: 1\n"
    )
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        held = asyncio.create_task(post(http, server, ALICE, chat("held")))
        request = await worker.next()
        refused = await post(http, server, ALICE, chat("second"))
        await worker.answer(request)
        first = await held
        worker.auto = True
        after = await post(http, server, ALICE, chat("third"))

    assert (429, "rate_limit_exceeded") == (refused[0], refused[2]["error"]["code"])
    assert [200, 200] == [first[0], after[0]]


async def test_a_response_without_usage_is_charged_by_its_bytes(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A response reporting no usage is charged one token per 4 bytes, in and out, and the
    state API and /metrics show the key's totals under its name."""
    server = await keyed_server(start_server, tmp_path, f"keys:\n  - name: app\n    key: {ALICE}\n")
    body = b'{"answer": "' + b"x" * 386 + b'"}'  # 400 bytes: 100 tokens
    async with raw_worker(server, auto=True, body=body), aiohttp.ClientSession() as http:
        sent = orjson.dumps(chat("y" * 100))
        async with http.post(
            server.url + "/v1/chat/completions", data=sent, headers=bearer(ALICE)
        ) as resp:
            status = resp.status
        async with http.get(server.url + "/api/v1/state", headers=bearer(ALICE)) as resp:
            keys = {k["name"]: k for k in (await resp.json())["keys"]}
        async with http.get(server.url + "/metrics") as resp:
            metrics = await resp.text()

    assert 200 == status
    app = keys["app"]
    # one chunk of 400 bytes goes out chunked: 7 bytes of framing, and 5 to end the body
    assert (1, -(-len(sent) // 4), -(-(400 + 12) // 4), 0, 0, 0) == (
        app["requests_total"],
        app["tokens_in_total"],
        app["tokens_out_total"],
        app["in_flight"],
        app["queued"],
        app["limited_total"],
    )
    assert {"app", ANONYMOUS} == set(keys)
    assert 'llamapool_key_tokens_total{key="app",kind="out"} 103.0' in metrics
    assert 'llamapool_key_requests_total{key="app"} 1.0' in metrics
    assert ALICE not in metrics


async def test_the_state_shows_a_keys_requests_in_flight_and_queued(
    start_server: StartServer, tmp_path: Path
) -> None:
    """While one request of a key runs and another waits, the state API says so."""
    server = await keyed_server(start_server, tmp_path, f"keys:\n  - name: app\n    key: {ALICE}\n")
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(post(http, server, ALICE, chat(f"r{i}"))) for i in range(2)]
        await until_queued(server, 1)
        async with http.get(server.url + "/api/v1/state", headers=bearer(ALICE)) as resp:
            (app,) = [k for k in (await resp.json())["keys"] if k["name"] == "app"]
        await worker.answer_next()
        await worker.answer_next()
        await asyncio.gather(*tasks)

    assert (2, 1, 1) == (app["requests_total"], app["in_flight"], app["queued"])
