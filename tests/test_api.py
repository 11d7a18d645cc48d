"""The server's HTTP surface: authentication, errors in each API's shape, model listings,
request ids and the worker socket's door."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from llamapool.errors import ConfigError
from llamapool.protocol import (
    Heartbeat,
    ProxyRequest,
    Register,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    decode,
    encode,
)
from llamapool.testing import create_fake_ollama_app, create_fake_vllm_app, fake_log

from .conftest import API_KEY, WORKER_KEY, PoolServer, StartServer, StartWorker, url_of, wait_for

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello pool"}]}
#: Every key-protected route, with a body that succeeds through a demo worker.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "demo", "prompt": "hello pool"}),
    ("POST", "/v1/embeddings", {"model": "demo", "input": "hello pool"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/demo", None),
    ("POST", "/api/generate", {"model": "demo", "prompt": "hello pool", "stream": False}),
    ("POST", "/api/chat", {**CHAT, "stream": False}),
    ("POST", "/api/embed", {"model": "demo", "input": "hello pool"}),
    ("GET", "/api/tags", None),
    ("GET", "/api/v1/state", None),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _ in ROUTES]


def is_ollama(path: str) -> bool:
    return path.startswith("/api/") and not path.startswith("/api/v1/")


def assert_error_shape(path: str, body: Any, *, code: str | None = None) -> None:
    """Ollama routes answer {"error": str}; the others {"error": {message, type, code}}."""
    if is_ollama(path):
        assert ["error"] == list(body)
        assert isinstance(body["error"], str)
        assert body["error"]
        return
    assert ["error"] == list(body)
    assert {"message", "type", "code"} == set(body["error"])
    assert isinstance(body["error"]["message"], str)
    assert isinstance(body["error"]["type"], str)
    if code is not None:
        assert code == body["error"]["code"]


async def call(
    http: aiohttp.ClientSession,
    server: PoolServer,
    method: str,
    path: str,
    *,
    json: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One request; answers its status, its JSON body, and the response."""
    async with http.request(
        method, server.url + path, json=json, data=data, headers=headers
    ) as resp:
        raw = await resp.read()
    return resp.status, orjson.loads(raw), resp


# --- authentication -------------------------------------------------------------------------


async def test_healthz_is_open_without_a_key(pool_server: PoolServer) -> None:
    """GET /healthz answers 200 JSON even though the server has an API key."""
    async with aiohttp.ClientSession() as http:
        status, body, resp = await call(http, pool_server, "GET", "/healthz")

    assert (200, "ok") == (status, body["status"])
    assert "application/json" == resp.content_type


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-key",
        f"Basic {API_KEY}",
        API_KEY,
        "Bearer ",
        f"Bearer {API_KEY}x",
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_api_routes_refuse_a_missing_or_wrong_key(
    pool_server: PoolServer,
    start_worker: StartWorker,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    authorization: str | None,
) -> None:
    """Every /v1 and /api route answers 401 JSON in its API's shape without the right key."""
    await start_worker(pool_server, "demo")
    headers = {"Authorization": authorization} if authorization is not None else {}

    async with aiohttp.ClientSession() as http:
        status, answer, resp = await call(
            http, pool_server, method, path, json=body, headers=headers
        )

    assert 401 == status
    assert "application/json" == resp.content_type
    assert "Bearer" == resp.headers["WWW-Authenticate"]
    assert_error_shape(path, answer, code="invalid_api_key")


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_api_routes_work_with_the_right_key(
    pool_server: PoolServer,
    start_worker: StartWorker,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    """Every /v1 and /api route answers 200 JSON with the right key."""
    await start_worker(pool_server, "demo")

    async with aiohttp.ClientSession() as http:
        status, answer, _ = await call(
            http, pool_server, method, path, json=body, headers=pool_server.auth
        )

    assert 200 == status
    assert "error" not in answer


async def test_any_of_several_keys_is_accepted(start_server: StartServer) -> None:
    """With API_KEY=k1,k2 both keys open the API; the scheme is case-insensitive."""
    server = await start_server(api_keys="key-one,key-two")

    async with aiohttp.ClientSession() as http:
        statuses = [
            (await call(http, server, "GET", "/v1/models", headers={"Authorization": auth}))[0]
            for auth in ("Bearer key-one", "Bearer key-two", "bearer key-one", "Bearer other")
        ]

    assert [200, 200, 200, 401] == statuses


async def test_without_a_configured_key_the_api_is_open(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """With no API key set, requests without Authorization are served."""
    server = await start_server(api_keys="")
    await start_worker(server, "demo")

    async with aiohttp.ClientSession() as http:
        chat, answer, _ = await call(http, server, "POST", "/v1/chat/completions", json=CHAT)
        tags, _, _ = await call(http, server, "GET", "/api/tags")

    assert (200, 200) == (chat, tags)
    assert "echo: hello pool" == answer["choices"][0]["message"]["content"]


# --- errors ---------------------------------------------------------------------------------

BAD_BODIES = [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"", id="empty"),
    pytest.param(b"[1, 2]", id="array"),
    pytest.param(b'"demo"', id="string"),
    pytest.param(b"{}", id="no-model"),
    pytest.param(b'{"model": 5}', id="model-number"),
    pytest.param(b'{"model": ""}', id="model-empty"),
    pytest.param(b'{"model": null}', id="model-null"),
    pytest.param(b'{"model": "demo", "stream": "yes"}', id="stream-string"),
    pytest.param(b'{"model": "demo", "stream": 1}', id="stream-number"),
    pytest.param(b'{"model": "%s"}' % (b"m" * 257), id="model-too-long"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat", "/api/embed"]
)
async def test_unroutable_bodies_answer_400(
    pool_server: PoolServer, start_worker: StartWorker, path: str, body: bytes
) -> None:
    """Malformed JSON, a non-object, a missing, non-string or too long model, or a non-bool
    stream answer 400 in the route's API shape."""
    await start_worker(pool_server, "demo")
    headers = {**pool_server.auth, "Content-Type": "application/json"}

    async with aiohttp.ClientSession() as http:
        status, answer, resp = await call(
            http, pool_server, "POST", path, data=body, headers=headers
        )

    assert 400 == status
    assert "application/json" == resp.content_type
    assert_error_shape(path, answer)


async def test_a_model_name_past_the_bound_is_neither_echoed_nor_logged_whole(
    pool_server: PoolServer,
) -> None:
    """A name longer than any worker may serve (256 characters) is a 400 that says so; the
    long name a client sends never reaches a log line or the answer."""
    name = "m" * (64 << 10)
    with capture_logs() as events:
        async with aiohttp.ClientSession() as http:
            status, answer, _ = await call(
                http,
                pool_server,
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "model": name},
                headers=pool_server.auth,
            )

    assert 400 == status
    assert "'model' must be at most 256 characters" == answer["error"]["message"]
    assert [] == [e for e in events if any(name in str(v) for v in e.values())]


@pytest.mark.parametrize(
    ("path", "streams"), [("/v1/chat/completions", False), ("/api/chat", True)]
)
async def test_a_null_stream_means_the_routes_default(
    pool_server: PoolServer, start_worker: StartWorker, path: str, streams: bool
) -> None:
    """``"stream": null`` is as if it were absent (OpenAI's schema allows null; Ollama reads
    it as not given): OpenAI's routes answer whole, Ollama's stream."""
    await start_worker(pool_server, "demo")

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            pool_server.url + path, json={**CHAT, "stream": None}, headers=pool_server.auth
        ) as resp,
    ):
        status, content_type = resp.status, resp.content_type

    assert 200 == status
    assert ("application/x-ndjson" if streams else "application/json") == content_type


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nothing"), ("POST", "/api/nothing"), ("GET", "/nothing"), ("GET", "/v2/models")],
)
async def test_unknown_paths_answer_404_json(
    pool_server: PoolServer, method: str, path: str
) -> None:
    """An unknown path answers 404 JSON, in Ollama's shape under /api and OpenAI's elsewhere."""
    async with aiohttp.ClientSession() as http:
        status, answer, resp = await call(http, pool_server, method, path, headers=pool_server.auth)

    assert 404 == status
    assert "application/json" == resp.content_type
    assert_error_shape(path, answer)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "no-such-model"}),
        ("/v1/embeddings", {"model": "no-such-model", "input": "x"}),
        ("/api/chat", {**CHAT, "model": "no-such-model"}),
        ("/api/generate", {"model": "no-such-model", "prompt": "x"}),
    ],
)
async def test_a_model_no_worker_serves_answers_404(
    pool_server: PoolServer, start_worker: StartWorker, path: str, body: dict[str, Any]
) -> None:
    """A model no connected worker serves answers 404 JSON naming the problem."""
    await start_worker(pool_server, "demo")

    async with aiohttp.ClientSession() as http:
        status, answer, _ = await call(
            http, pool_server, "POST", path, json=body, headers=pool_server.auth
        )

    assert 404 == status
    assert_error_shape(path, answer, code="model_not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/embeddings", "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/v1/models/demo", "GET"),
        ("GET", "/api/chat", "POST"),
        ("POST", "/api/tags", "GET"),
    ],
)
async def test_a_wrong_method_answers_405_with_allow(
    pool_server: PoolServer, method: str, path: str, allowed: str
) -> None:
    """A route called with the wrong method answers 405 JSON and an Allow header."""
    async with aiohttp.ClientSession() as http:
        status, answer, resp = await call(http, pool_server, method, path, headers=pool_server.auth)

    assert 405 == status
    assert allowed in resp.headers["Allow"].replace(" ", "").split(",")
    assert_error_shape(path, answer)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_a_body_over_the_limit_answers_413(start_server: StartServer, path: str) -> None:
    """A body larger than max_body_size answers 413 JSON in the route's shape."""
    server = await start_server(max_body_size=1024)
    body = {"model": "demo", "messages": [{"role": "user", "content": "x" * 4096}]}

    async with aiohttp.ClientSession() as http:
        status, answer, _ = await call(http, server, "POST", path, json=body, headers=server.auth)

    assert 413 == status
    assert_error_shape(path, answer)


# --- model listings -------------------------------------------------------------------------


async def test_v1_models_lists_models_with_their_workers_and_first_seen_time(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """GET /v1/models lists every model once, owned_by its workers' names, created when the
    pool first saw it."""
    alpha_backend = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b", "phi3"]))
    beta_backend = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b", "qwen2:7b"]))
    before = int(time.time())
    await start_worker(
        pool_server, "ollama", backend_url=url_of(alpha_backend), worker_name="alpha"
    )
    after = int(time.time())

    async with aiohttp.ClientSession() as http:
        _, first, _ = await call(http, pool_server, "GET", "/v1/models", headers=pool_server.auth)
        await start_worker(
            pool_server, "ollama", backend_url=url_of(beta_backend), worker_name="beta"
        )
        status, listing, _ = await call(
            http, pool_server, "GET", "/v1/models", headers=pool_server.auth
        )

    created = {m["id"]: m["created"] for m in first["data"]}
    assert 200 == status
    assert "list" == listing["object"]
    assert [
        ("llama3:8b", "alpha,beta"),
        ("phi3", "alpha"),
        ("qwen2:7b", "beta"),
    ] == [(m["id"], m["owned_by"]) for m in listing["data"]]
    assert {"model"} == {m["object"] for m in listing["data"]}
    assert before <= created["llama3:8b"] <= after
    assert created["llama3:8b"] == listing["data"][0]["created"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/meta-llama/Llama-3.1-8B-Instruct",
        "/v1/models/meta-llama%2FLlama-3.1-8B-Instruct",  # how the openai SDK sends it
    ],
)
async def test_v1_model_by_id_may_contain_a_slash(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    path: str,
) -> None:
    """GET /v1/models/{id} finds a Hugging Face style id with a '/', plain or percent-encoded."""
    backend = await aiohttp_server(create_fake_vllm_app())
    await start_worker(pool_server, "vllm", backend_url=url_of(backend), worker_name="gpu")

    async with aiohttp.ClientSession() as http:
        status, model, _ = await call(http, pool_server, "GET", path, headers=pool_server.auth)

    assert 200 == status
    assert {
        "id": "meta-llama/Llama-3.1-8B-Instruct",
        "object": "model",
        "owned_by": "gpu",
    } == {k: model[k] for k in ("id", "object", "owned_by")}


async def test_v1_model_by_id_may_contain_a_colon_and_resolves_aliases(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """GET /v1/models/llama3:8b finds the model; llama3:8b-q4_0 resolves to it; others 404."""
    backend = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b"]))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))

    async with aiohttp.ClientSession() as http:
        exact = await call(
            http, pool_server, "GET", "/v1/models/llama3:8b", headers=pool_server.auth
        )
        alias = await call(
            http, pool_server, "GET", "/v1/models/llama3:8b-q4_0", headers=pool_server.auth
        )
        missing = await call(
            http, pool_server, "GET", "/v1/models/qwen2:7b", headers=pool_server.auth
        )

    assert (200, "llama3:8b") == (exact[0], exact[1]["id"])
    assert (200, "llama3:8b") == (alias[0], alias[1]["id"])
    assert 404 == missing[0]
    assert_error_shape("/v1/models/qwen2:7b", missing[1], code="model_not_found")


async def test_api_tags_aggregates_every_workers_models(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """GET /api/tags lists the union of all workers' models once each, in Ollama's shape."""
    first = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b", "phi3"]))
    second = await aiohttp_server(create_fake_ollama_app(models=["phi3", "qwen2:7b"]))
    third = await aiohttp_server(create_fake_vllm_app(models=["mistral-7b"]))
    await start_worker(pool_server, "ollama", backend_url=url_of(first))
    await start_worker(pool_server, "ollama", backend_url=url_of(second))
    await start_worker(pool_server, "vllm", backend_url=url_of(third))

    async with aiohttp.ClientSession() as http:
        status, tags, _ = await call(
            http, pool_server, "GET", "/api/tags", headers=pool_server.auth
        )

    assert 200 == status
    assert ["llama3:8b", "mistral-7b", "phi3", "qwen2:7b"] == [m["name"] for m in tags["models"]]
    assert [m["name"] for m in tags["models"]] == [m["model"] for m in tags["models"]]
    for model in tags["models"]:
        assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(model)


async def test_the_listings_forget_a_worker_that_left(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Once a worker disconnects, its models leave /v1/models and /api/tags."""
    backend = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b"]))
    agent = await start_worker(pool_server, "ollama", backend_url=url_of(backend))
    handle = pool_server.pool.get(agent.cfg.worker_id)
    assert handle is not None

    handle.link.close_soon("test: worker leaves")
    await wait_for(lambda: 0 == len(pool_server.pool), what="the worker to leave")

    async with aiohttp.ClientSession() as http:
        _, models, _ = await call(http, pool_server, "GET", "/v1/models", headers=pool_server.auth)
        _, tags, _ = await call(http, pool_server, "GET", "/api/tags", headers=pool_server.auth)
    assert ([], []) == (models["data"], tags["models"])


# --- request ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
        ("POST", "/api/chat", CHAT),  # Ollama streams by default
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {**CHAT, "model": "missing"}),
        ("GET", "/healthz", None),
    ],
    ids=["plain", "sse", "ndjson", "models", "404", "healthz"],
)
async def test_a_given_request_id_is_kept(
    pool_server: PoolServer,
    start_worker: StartWorker,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    """The client's X-Request-Id comes back on every response, streamed or not."""
    await start_worker(pool_server, "demo")
    headers = {**pool_server.auth, "X-Request-Id": "client-req-42"}

    async with (
        aiohttp.ClientSession() as http,
        http.request(method, pool_server.url + path, json=body, headers=headers) as resp,
    ):
        await resp.read()

    assert "client-req-42" == resp.headers["X-Request-Id"]


@pytest.mark.parametrize(
    "given", [None, "", "has spaces", "x" * 129, "semi;colon"], ids=lambda g: repr(g)[:12]
)
async def test_a_request_id_is_made_when_none_usable_is_given(
    pool_server: PoolServer, start_worker: StartWorker, given: str | None
) -> None:
    """Without a usable X-Request-Id the server makes a fresh one for each response."""
    await start_worker(pool_server, "demo")
    headers = dict(pool_server.auth)
    if given is not None:
        headers["X-Request-Id"] = given
    requests = [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
        ("GET", "/v1/models", None),
        ("GET", "/healthz", None),
    ]

    async with aiohttp.ClientSession() as http:
        ids = []
        for method, path, body in requests:
            async with http.request(
                method, pool_server.url + path, json=body, headers=headers
            ) as resp:
                await resp.read()
                ids.append(resp.headers["X-Request-Id"])

    assert 4 == len(set(ids))
    assert all(id_ and id_ != given and " " not in id_ for id_ in ids)


async def test_the_request_id_reaches_the_backend(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The backend sees the same X-Request-Id the client gets back."""
    backend = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b"]))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))
    body = {**CHAT, "model": "llama3:8b"}

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            pool_server.url + "/v1/chat/completions", json=body, headers=pool_server.auth
        ) as resp,
    ):
        await resp.read()

    sent = [r for r in fake_log(backend.app).requests if r.path == "/v1/chat/completions"]
    assert [resp.headers["X-Request-Id"]] == [
        CIMultiDict(r.headers).get("X-Request-Id") for r in sent
    ]


# --- the worker socket ----------------------------------------------------------------------


async def test_a_worker_with_a_wrong_key_is_closed_with_1008(pool_server: PoolServer) -> None:
    """A register with a wrong key is answered with close code 1008 and joins no pool."""
    register = Register(worker_id="intruder", worker_key="wrong", models=["m"], protocol=1)

    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(encode(register))
        msg = await ws.receive(timeout=5)

    assert WSMsgType.CLOSE == msg.type
    assert 1008 == msg.data
    assert None is pool_server.pool.get("intruder")
    assert 0 == len(pool_server.pool)


@pytest.mark.parametrize(
    "first",
    [
        encode(Heartbeat(ts=1)),
        "not json",
        '{"type": "register", "models": "m"}',
        '{"type": "something_else"}',
    ],
    ids=["heartbeat", "not-json", "bad-register", "unknown-type"],
)
async def test_a_socket_that_does_not_start_with_a_register_is_closed_with_1008(
    pool_server: PoolServer, first: str
) -> None:
    """The first message must be a valid register; anything else closes the socket (1008)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(first)
        msg = await ws.receive(timeout=5)

    assert (WSMsgType.CLOSE, 1008) == (msg.type, msg.data)
    assert 0 == len(pool_server.pool)


async def test_an_agent_with_a_wrong_key_stops_with_a_config_error(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A worker whose key the server refuses stops with ConfigError instead of retrying."""
    with pytest.raises(ConfigError, match="rejected"):
        await start_worker(pool_server, "demo", worker_key="wrong-key")

    assert 0 == len(pool_server.pool)


async def test_a_go_worker_registering_with_token_is_accepted(pool_server: PoolServer) -> None:
    """A Go worker (legacy token field, no extensions) joins and is served requests as JSON."""
    register = {
        "type": "register",
        "worker_id": "go-1",
        "worker_name": "go",
        "token": WORKER_KEY,
        "models": ["go-model"],
        "max_concurrency": 1,
    }

    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(orjson.dumps(register).decode())
        await wait_for(lambda: pool_server.pool.get("go-1") is not None, what="the Go worker")
        answer = asyncio.create_task(
            call(
                http,
                pool_server,
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "model": "go-model"},
                headers=pool_server.auth,
            )
        )
        first = await ws.receive(timeout=5)
        request = decode(first.data)
        assert isinstance(request, ProxyRequest)
        rid = request.request_id
        await ws.send_str(encode(ResponseHeaders(rid, 200, {"Content-Type": "application/json"})))
        await ws.send_str(encode(ResponseChunk(rid, b'{"answer": "from go"}')))
        await ws.send_str(encode(ResponseEnd(rid)))
        status, body, _ = await answer

    assert WSMsgType.TEXT == first.type
    assert ("/v1/chat/completions", 0) == (request.path, request.body_len)
    assert "go-model" == orjson.loads(request.body)["model"]
    assert (200, {"answer": "from go"}) == (status, body)


async def test_the_worker_socket_path_is_configurable(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """With ws_path set, workers connect there and the default path is not a socket."""
    server = await start_server(ws_path="/private/pool-socket")
    agent = await start_worker(server, "demo")

    async with aiohttp.ClientSession() as http:
        status, answer, _ = await call(http, server, "GET", "/workers/connect")

    assert server.ws_url.endswith("/private/pool-socket")
    assert server.pool.get(agent.cfg.worker_id) is not None
    assert 404 == status
    assert_error_shape("/workers/connect", answer)
