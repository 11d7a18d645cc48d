"""The backend plugin contract as tests: what every plugin must do, run against its fake runtime.

Subclass :class:`BackendContract` as a ``Test...`` class in the plugin's tests and fill in its
class attributes; pytest then runs each of its tests against the fake runtime on a loopback port
(pytest-aiohttp's ``aiohttp_server``; the async tests carry pytest-asyncio's mark, so they run in
its strict mode too). For a plugin of an OpenAI-compatible runtime that takes a bearer key::

    class TestMyBackend(BackendContract):
        backend = MyBackend
        entry_point, distribution = "mybackend", "llamapool-mybackend"
        fake = staticmethod(create_fake_vllm_app)
        models_path, model_list = "/v1/models", "an OpenAI model list"
        model = "qwen2.5-7b"
        bodies = {"/v1/chat/completions": {"model": "qwen2.5-7b", "messages": []}}

The plugin's own tests add what only it does (its path mapping, its default URL, ...). The
three plugins in ``plugins/`` run this same contract. This module needs pytest and
pytest-aiohttp, so ``llamapool.testing`` does not import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import Backend, BackendError, BackendSettings
from llamapool.testing.fakes import create_broken_app, fake_log, url_of
from llamapool.worker.loader import available, load_backend

#: Answers no model list can be read from, and what the error must say of each (``{list}``:
#: the plugin's :attr:`BackendContract.model_list`).
BAD_ANSWERS: Sequence[tuple[int, bytes, str, str]] = (
    (500, b"internal error", "text/plain", "answered HTTP 500"),
    (200, b"<html>a web page</html>", "text/html", "did not answer JSON"),
    (200, b'{"unexpected": []}', "application/json", "did not answer {list}"),
    (200, b"[]", "application/json", "did not answer {list}"),
)
_BAD_ANSWER_IDS = ("http-500", "not-json", "wrong-object", "an-array")


class BackendContract:
    """The tests every backend plugin passes; a subclass names the plugin and its runtime."""

    #: The plugin's :class:`Backend` subclass, the name its entry point registers
    #: (``--backend``), and the distribution that declares it.
    backend: ClassVar[type[Backend]]
    entry_point: ClassVar[str]
    distribution: ClassVar[str]
    #: The fake runtime: called with ``models`` and ``api_key`` (which it then requires).
    fake: Callable[..., web.Application]
    #: The path ``list_models`` reads, and how the plugin's errors name what it expected there
    #: (``"an OpenAI model list"``).
    models_path: ClassVar[str]
    model_list: ClassVar[str]
    #: A model the fake serves by default, and a valid request body for each path to check.
    model: ClassVar[str]
    bodies: ClassVar[Mapping[str, Mapping[str, Any]]]
    #: The runtime's route for a public path, where it is not the same path.
    routes: ClassVar[Mapping[str, str]] = {}
    #: The key the fake requires and the backend sends.
    key: ClassVar[str] = "backend-key"

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Each body, and each bad answer, is a test of its own."""
        if "path" in metafunc.fixturenames:
            metafunc.parametrize("path", sorted(self.bodies))
        if "bad_answer" in metafunc.fixturenames:
            metafunc.parametrize("bad_answer", BAD_ANSWERS, ids=_BAD_ANSWER_IDS)

    def backend_for(self, url: str, api_key: str | None = None) -> Backend:
        return self.backend(
            BackendSettings(url=url, api_key=self.key if api_key is None else api_key)
        )

    @pytest.mark.asyncio
    async def test_list_models_answers_the_runtimes_models_and_sends_the_key(
        self, aiohttp_server: AiohttpServer
    ) -> None:
        """list_models answers the models the runtime lists, in its order, asking once with
        the backend's auth headers."""
        server = await aiohttp_server(
            self.fake(models=[self.model, "other-model"], api_key=self.key)
        )
        backend = self.backend_for(url_of(server))

        async with aiohttp.ClientSession() as http:
            models = await backend.list_models(http)

        (sent,) = fake_log(server.app).requests
        assert [self.model, "other-model"] == models
        assert self.models_path == sent.path
        assert dict(backend.auth_headers()).items() <= dict(sent.headers).items()

    @pytest.mark.asyncio
    async def test_list_models_raises_when_the_runtime_is_down(self, unused_tcp_port: int) -> None:
        """Connection refused becomes a BackendError naming the URL it tried."""
        url = f"http://127.0.0.1:{unused_tcp_port}"

        async with aiohttp.ClientSession() as http:
            with pytest.raises(BackendError, match=f"GET {url}{self.models_path} failed"):
                await self.backend_for(url).list_models(http)

    @pytest.mark.asyncio
    async def test_list_models_raises_when_the_key_is_refused(
        self, aiohttp_server: AiohttpServer
    ) -> None:
        """A key the runtime refuses becomes a BackendError naming the status."""
        server = await aiohttp_server(self.fake(api_key=self.key))

        async with aiohttp.ClientSession() as http:
            with pytest.raises(BackendError, match="answered HTTP 401"):
                await self.backend_for(url_of(server), "wrong-key").list_models(http)

    @pytest.mark.asyncio
    async def test_list_models_raises_on_a_bad_answer(
        self, aiohttp_server: AiohttpServer, bad_answer: tuple[int, bytes, str, str]
    ) -> None:
        """A failing, non-JSON or wrongly shaped answer becomes a BackendError saying which."""
        status, body, content_type, message = bad_answer
        app = create_broken_app(status=status, body=body, content_type=content_type)
        server = await aiohttp_server(app)

        async with aiohttp.ClientSession() as http:
            with pytest.raises(BackendError, match=message.format(list=self.model_list)):
                await self.backend_for(url_of(server)).list_models(http)

    @pytest.mark.asyncio
    async def test_a_request_reaches_the_runtime_unchanged(
        self, aiohttp_server: AiohttpServer, path: str
    ) -> None:
        """A request to upstream_url with auth_headers reaches the runtime's route for the path
        with its body and the key intact, and gets the runtime's answer."""
        server = await aiohttp_server(self.fake(api_key=self.key))
        backend = self.backend_for(url_of(server))
        body = orjson.dumps(self.bodies[path])

        async with (
            aiohttp.ClientSession() as http,
            http.post(
                backend.upstream_url(path), data=body, headers=backend.auth_headers()
            ) as resp,
        ):
            answer = await resp.json()

        (sent,) = fake_log(server.app).requests
        assert (200, self.routes.get(path, path), body) == (resp.status, sent.path, sent.body)
        assert dict(backend.auth_headers()).items() <= dict(sent.headers).items()
        assert self.model == answer["model"]

    def test_auth_headers_carry_the_key_or_nothing(self) -> None:
        """With a key, the auth headers carry it; without one there are none."""
        with_key = dict(self.backend_for("", "s3cret-key").auth_headers())

        assert with_key
        assert all("s3cret-key" in value for value in with_key.values())
        assert {} == dict(self.backend_for("", "").auth_headers())

    def test_found_through_its_entry_point(self) -> None:
        """``--backend <entry_point>`` loads this class, from this distribution."""
        assert self.backend is load_backend(self.entry_point)
        dist = available()[self.entry_point].dist
        assert dist is not None
        assert self.distribution == dist.name
