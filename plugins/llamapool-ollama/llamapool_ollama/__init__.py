"""The Ollama backend for llamapool workers.

Ollama serves its native API (``/api/*``), an OpenAI-compatible one (chat, text completions,
embeddings, and since 0.13 the Responses API) and an Anthropic-compatible ``/v1/messages`` on
the same port, at the very paths the llamapool server exposes, so every public path maps to
itself and the bytes go through untouched. An older Ollama answers its own 404 for the newer
paths, relayed. The plugin imports only :mod:`llamapool.plugin_api`, like any
third-party backend, and is found through the ``llamapool.backends`` entry point ``ollama``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from llamapool.plugin_api import (
    LOADED_MODELS_PATH,
    OLLAMA_PATHS,
    Backend,
    BackendError,
    fetch_json,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ["OllamaBackend"]

#: The OpenAI- and Anthropic-shaped paths Ollama serves (docs.ollama.com, "OpenAI
#: compatibility" and "Anthropic compatibility").
COMPATIBLE_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"}
)


class OllamaBackend(Backend):
    """An Ollama server (``ollama serve``), by default on its standard local port.

    Ollama has no API key; if it sits behind an authenticating proxy, the worker's backend key
    is sent as a bearer token.
    """

    #: ``/api/ps`` too: the server asks it what this Ollama holds in memory.
    paths: ClassVar[frozenset[str]] = OLLAMA_PATHS | COMPATIBLE_PATHS | {LOADED_MODELS_PATH}
    default_url: ClassVar[str] = "http://127.0.0.1:11434"

    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        """The names in ``GET /api/tags``: the models pulled on this machine."""
        url = self.base_url + "/api/tags"
        return _names(await fetch_json(http, url, headers=self.auth_headers()), url)


def _names(data: Any, url: str) -> list[str]:
    """Model names out of an ``/api/tags`` body, or a :class:`BackendError` saying what is wrong."""
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) for m in models
    ):
        raise BackendError(f"GET {url} did not answer an Ollama model list (is this Ollama?)")
    return [m["name"] for m in models]
