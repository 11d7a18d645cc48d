"""Stream fidelity: answers in every API's recorded shape reach the client through the pool
byte for byte, cut wherever the runtime cut them, and the usage they report is counted."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.server.usage import Usage, UsageScanner
from llamapool.testing import Replay, create_replay_app, fake_log

from .conftest import API_KEY, PoolServer, StartWorker, url_of
from .observability_helpers import scrape_until, settled
from .recorded_streams import (
    CHAT_REQUEST,
    CHAT_STREAM,
    MESSAGES_BODY,
    MESSAGES_STREAM,
    MODEL,
    RESPONSES_BODY,
    RESPONSES_STREAM,
    STRUCTURED,
    STRUCTURED_REQUEST,
)


def cut(data: bytes, size: int = 37) -> list[bytes]:
    """The body in chunks of an awkward size: events split mid-line, mid-field, mid-number."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def scan(*chunks: bytes) -> Usage | None:
    scanner = UsageScanner()
    for piece in chunks:
        scanner.feed(memoryview(piece))
    return scanner.usage()


CASES: dict[str, tuple[str, dict[str, Any], Replay, Usage]] = {
    "chat stream: reasoning, tool-call deltas, include_usage": (
        "/v1/chat/completions",
        CHAT_REQUEST,
        Replay(cut(CHAT_STREAM)),
        Usage(182, 47),
    ),
    "chat: structured output": (
        "/v1/chat/completions",
        STRUCTURED_REQUEST,
        Replay(cut(STRUCTURED), content_type="application/json"),
        Usage(64, 16),
    ),
    "responses stream": (
        "/v1/responses",
        {"model": MODEL, "input": "Hi", "stream": True},
        Replay(cut(RESPONSES_STREAM)),
        Usage(21, 3),
    ),
    "responses body": (
        "/v1/responses",
        {"model": MODEL, "input": "Hi"},
        Replay(cut(RESPONSES_BODY), content_type="application/json"),
        Usage(21, 3),
    ),
    "anthropic stream": (
        "/v1/messages",
        {
            "model": MODEL,
            "max_tokens": 256,
            "stream": True,
            "messages": [{"role": "user", "content": "Weather?"}],
        },
        Replay(cut(MESSAGES_STREAM)),
        Usage(472, 89),
    ),
    "anthropic body": (
        "/v1/messages",
        {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "Hi"}]},
        Replay(cut(MESSAGES_BODY), content_type="application/json"),
        Usage(12, 6),
    ),
}


@pytest.mark.parametrize(
    ("body", "expected"), [(c[2].body, c[3]) for c in CASES.values()], ids=list(CASES)
)
def test_the_scanner_reads_every_apis_usage_at_every_split(body: bytes, expected: Usage) -> None:
    """The usage scanner finds each API's usage (Responses, Anthropic included) wherever the
    body is cut in two."""
    found = {at: scan(body[:at], body[at:]) for at in range(len(body) + 1)}

    assert dict.fromkeys(found, expected) == found


async def replaying_pool(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    replies: dict[str, Replay],
) -> Any:
    backend = await aiohttp_server(create_replay_app(replies, models=[MODEL]))
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))
    return backend


@pytest.mark.parametrize(
    ("path", "request_body", "replay", "usage"), CASES.values(), ids=list(CASES)
)
async def test_answers_arrive_byte_for_byte_and_their_usage_is_counted(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    path: str,
    request_body: dict[str, Any],
    replay: Replay,
    usage: Usage,
) -> None:
    """The client receives exactly the bytes the runtime sent, the runtime exactly the bytes
    the client sent, and /metrics counts the tokens the answer reported."""
    backend = await replaying_pool(aiohttp_server, pool_server, start_worker, {path: replay})
    sent = orjson.dumps(request_body)
    headers = {**pool_server.auth, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(pool_server.url + path, data=sent, headers=headers) as resp,
    ):
        received = (resp.status, resp.content_type, await resp.read())

    metrics = await scrape_until(
        pool_server.url,
        lambda m: m.value("llamapool_model_tokens_total", model=MODEL, kind="out") > 0,
        what="the tokens to be counted",
    )
    assert (200, replay.content_type, replay.body) == received
    assert sent == fake_log(backend.app).requests[-1].body
    assert [usage.tokens_in, usage.tokens_out] == [
        metrics.value("llamapool_model_tokens_total", model=MODEL, kind=kind)
        for kind in ("in", "out")
    ]


async def test_the_sdks_read_the_replayed_streams(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The openai SDK assembles the tool call from its argument deltas and reads the usage-only
    chunk; the anthropic SDK assembles thinking, text and tool input; the state API counts
    both answers' tokens."""
    replies = {
        "/v1/chat/completions": Replay(cut(CHAT_STREAM)),
        "/v1/messages": Replay(cut(MESSAGES_STREAM)),
    }
    await replaying_pool(aiohttp_server, pool_server, start_worker, replies)
    oai = openai.AsyncOpenAI(base_url=pool_server.url + "/v1", api_key=API_KEY)
    claude = anthropic.AsyncAnthropic(base_url=pool_server.url, api_key=API_KEY)

    async with oai.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        stream_options={"include_usage": True},
    ) as chat:
        completion = await chat.get_final_completion()
    async with claude.messages.stream(
        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": "Weather?"}]
    ) as stream:
        message = await stream.get_final_message()
    await oai.close()
    await claude.close()
    state = await settled(pool_server)

    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert ("get_weather", '{"city": "Paris", "unit": "C"}') == (
        call.function.name,  # type: ignore[union-attr]
        call.function.arguments,  # type: ignore[union-attr]
    )
    assert (182, 47) == (completion.usage.prompt_tokens, completion.usage.completion_tokens)  # type: ignore[union-attr]
    assert ["thinking", "text", "tool_use"] == [block.type for block in message.content]
    assert {"city": "Paris"} == message.content[2].input  # type: ignore[union-attr]
    assert (472, 89) == (message.usage.input_tokens, message.usage.output_tokens)
    worker = state["workers"][0]
    assert (182 + 472, 47 + 89) == (worker["tokens_in_total"], worker["tokens_out_total"])


async def test_count_tokens_is_not_counted_as_usage(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """An Anthropic count_tokens answer ({"input_tokens": n}) is a count, not consumption: the
    state API adds no tokens for it, while a message through the demo counts both ways."""
    await start_worker(pool_server, "demo")
    client = anthropic.AsyncAnthropic(base_url=pool_server.url, api_key=API_KEY)
    messages = [{"role": "user", "content": "one two three"}]

    counted = await client.messages.count_tokens(model="demo", messages=messages)  # type: ignore[arg-type]
    after_count = (await settled(pool_server))["workers"][0]
    message = await client.messages.create(model="demo", max_tokens=64, messages=messages)  # type: ignore[arg-type]
    after_message = (await settled(pool_server))["workers"][0]
    await client.close()

    assert 3 == counted.input_tokens
    assert (0, 0) == (after_count["tokens_in_total"], after_count["tokens_out_total"])
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        after_message["tokens_in_total"],
        after_message["tokens_out_total"],
    )
