"""The Anthropic Messages API through the pool: the official SDK, ``x-api-key``, streaming,
and errors in Anthropic's shape."""

from __future__ import annotations

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.testing import create_fake_vllm_app, fake_log

from .conftest import API_KEY, PoolServer, StartWorker, url_of

MODEL = "Qwen/Qwen3-8B"


async def vllm_worker(
    aiohttp_server: AiohttpServer, server: PoolServer, start_worker: StartWorker
) -> TestServer:
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    await start_worker(server, "vllm", backend_url=url_of(backend))
    return backend


async def test_sdk_message_with_x_api_key(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The anthropic SDK (key sent as x-api-key) gets the backend's message; the backend never
    sees the client's key."""
    backend = await vllm_worker(aiohttp_server, pool_server, start_worker)
    client = anthropic.AsyncAnthropic(base_url=pool_server.url, api_key=API_KEY)

    message = await client.messages.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hello pool"}]
    )
    await client.close()

    sent = fake_log(backend.app).requests[-1]
    assert "echo: hello pool" == message.content[0].text  # type: ignore[union-attr]
    assert "/v1/messages" == sent.path
    assert API_KEY not in repr(sent.headers)


async def test_sdk_stream_and_count_tokens(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A streamed message arrives event by event to the SDK, and count_tokens answers."""
    await start_worker(pool_server, "demo")
    client = anthropic.AsyncAnthropic(base_url=pool_server.url, api_key=API_KEY)
    messages = [{"role": "user", "content": "one two three"}]

    async with client.messages.stream(
        model="demo",
        max_tokens=64,
        messages=messages,  # type: ignore[arg-type]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    counted = await client.messages.count_tokens(model="demo", messages=messages)  # type: ignore[arg-type]
    await client.close()

    assert "echo: one two three" == text
    assert (4, 3) == (final.usage.output_tokens, counted.input_tokens)


async def test_a_wrong_key_is_an_anthropic_authentication_error(pool_server: PoolServer) -> None:
    """A wrong x-api-key answers 401 in Anthropic's error shape, which the SDK reads."""
    client = anthropic.AsyncAnthropic(base_url=pool_server.url, api_key="wrong", max_retries=0)

    with pytest.raises(anthropic.AuthenticationError) as caught:
        await client.messages.create(
            model="demo", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    await client.close()

    body = caught.value.body
    assert isinstance(body, dict)
    assert ("error", "authentication_error") == (body["type"], body["error"]["type"])
    assert isinstance(body["error"]["message"], str)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{", 400, "invalid_request_error"),
        (orjson.dumps({"model": "nobody-serves-this", "max_tokens": 8}), 404, "not_found_error"),
    ],
)
async def test_pool_errors_on_messages_take_anthropics_shape(
    pool_server: PoolServer, body: bytes, status: int, kind: str
) -> None:
    """Errors the pool answers on /v1/messages are {"type": "error", "error": {type, message}}."""
    headers = {"x-api-key": API_KEY, "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(pool_server.url + "/v1/messages", data=body, headers=headers) as resp,
    ):
        answer = orjson.loads(await resp.read())

    assert (status, "error", kind) == (resp.status, answer["type"], answer["error"]["type"])
    assert isinstance(answer["error"]["message"], str)
