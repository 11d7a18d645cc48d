"""The contract between the worker and a backend plugin: the only module a plugin imports.

A backend adapter is a small strategy object. It tells the worker how to reach one kind of LLM
runtime: which public API paths it serves and at which upstream URL, which headers to add, and
how to list the runtime's models. It never translates a protocol: request and response bytes go
through unchanged, and where the runtime lacks Ollama's native API but serves OpenAI's, the
worker translates by itself. The worker owns the HTTP session and the request loop.

To add a backend, subclass :class:`Backend` and declare it in your distribution::

    [options.entry_points]
    llamapool.backends =
        mybackend = my_package:MyBackend

Then run ``llamapool work --backend mybackend``.
"""

from __future__ import annotations

import abc
from collections.abc import Container, Mapping
from typing import Any, ClassVar

import aiohttp
import attrs

from llamapool.errors import BackendError
from llamapool.urls import without_credentials

__all__ = [
    "ANTHROPIC_PATHS",
    "API_VERSION",
    "LOADED_MODELS_PATH",
    "OLLAMA_PATHS",
    "OPENAI_PATHS",
    "Backend",
    "BackendError",
    "BackendSettings",
    "fetch_json",
]

#: Bumped when the contract changes. Version 2 (llamapool 2) grew the path sets below to every
#: model endpoint the server relays and added :data:`ANTHROPIC_PATHS`: a plugin that declares
#: ``OPENAI_PATHS`` now also gets the Responses, rerank, audio and image paths (a path its
#: runtime lacks gets the runtime's own answer, relayed). List the paths to keep a narrower set.
#: Version 3 added :meth:`Backend.native_models`, with a default that keeps version 2 plugins
#: working unchanged; a worker now also offers Ollama's native paths for a backend that serves
#: their OpenAI counterparts, and translates; and :data:`LOADED_MODELS_PATH`, which a backend
#: declares to have the server ask it what it holds in memory.
API_VERSION = 3

#: The OpenAI API paths the server relays (``/rerank`` and ``/v1/score`` are the spellings
#: vLLM and llama.cpp's server use for reranking).
OPENAI_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/rerank",
        "/v1/score",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/audio/speech",
        "/v1/images/generations",
        "/v1/images/edits",
    }
)
#: The Anthropic API paths the server relays.
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
#: The Ollama native API paths the server relays (``/api/show`` only for workers that serve
#: it; for the others the server describes the model itself).
OLLAMA_PATHS = frozenset(
    {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show"}
)
#: Ollama's list of the models loaded in memory. A backend that declares it in
#: :attr:`Backend.paths` answers ``GET`` there in Ollama's shape (``{"models": [...]}``); the
#: server asks each such worker whenever a client asks the pool's own ``/api/ps``, and merges.
LOADED_MODELS_PATH = "/api/ps"


@attrs.frozen
class BackendSettings:
    """Where the runtime is and how to authenticate to it."""

    url: str
    api_key: str = attrs.field(default="", repr=False)


class Backend(abc.ABC):
    """One kind of LLM runtime, as the worker sees it.

    Subclasses set :attr:`paths` and :attr:`default_url` and implement :meth:`list_models`;
    the rest has defaults that suit most HTTP runtimes.
    """

    #: Public API paths (as clients call the server) this backend serves natively. The worker
    #: also offers the Ollama paths in :data:`OLLAMA_PATHS` whose OpenAI counterpart is here
    #: (``/api/chat`` for ``/v1/chat/completions``, and so on), and translates them.
    paths: ClassVar[frozenset[str]]
    #: Base URL used when the operator gives none.
    default_url: ClassVar[str]

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings

    @property
    def base_url(self) -> str:
        return (self.settings.url or self.default_url).rstrip("/")

    def upstream_url(self, path: str) -> str:
        """The runtime's URL for a public API path in :attr:`paths`."""
        return self.base_url + path

    def native_models(self, path: str) -> Container[str] | None:
        """The models for which the runtime serves ``path`` (one of :attr:`paths`) itself;
        ``None`` (the default) means all of them.

        Only asked for an Ollama path the worker could also translate: a runtime that proxies
        some models to Ollama and others elsewhere (Open WebUI) names the Ollama ones, and the
        worker translates the request for the others.
        """
        return None

    def auth_headers(self) -> Mapping[str, str]:
        """Headers that authenticate the worker to the runtime (never the client's)."""
        if self.settings.api_key:
            return {"Authorization": f"Bearer {self.settings.api_key}"}
        return {}

    @abc.abstractmethod
    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        """The model ids the runtime serves now; raise :class:`BackendError` if it is down."""

    async def start(self) -> None:
        """Acquire what the backend needs before serving (most need nothing)."""

    async def close(self) -> None:
        """Release what :meth:`start` acquired."""


async def fetch_json(
    http: aiohttp.ClientSession, url: str, *, headers: Mapping[str, str] | None = None
) -> Any:
    """GET ``url`` and decode its JSON body, turning every failure into :class:`BackendError`
    (whose message shows the URL without the credentials it may hold)."""
    try:
        async with http.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise BackendError(f"GET {without_credentials(url)} answered HTTP {resp.status}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = without_credentials(f"GET {url} failed: {exc or type(exc).__name__}")
        raise BackendError(error) from None
    except ValueError:
        raise BackendError(f"GET {without_credentials(url)} did not answer JSON") from None
