"""The vLLM backend for llamapool workers; it suits any OpenAI-compatible server.

vLLM, llama.cpp's ``llama-server``, LM Studio and the like serve the OpenAI API under ``/v1``
(vLLM and llama.cpp also Anthropic's ``/v1/messages``) and nothing of Ollama's native
``/api/*``, so this backend offers every OpenAI and Anthropic path and maps each to itself; a
path the runtime lacks answers its own 404, relayed. The plugin imports only
:mod:`llamapool.plugin_api`, like any third-party backend, and is found through the
``llamapool.backends`` entry point ``vllm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from llamapool.plugin_api import ANTHROPIC_PATHS, OPENAI_PATHS, Backend, BackendError, fetch_json

if TYPE_CHECKING:
    import aiohttp

__all__ = ["VllmBackend"]


class VllmBackend(Backend):
    """An OpenAI-compatible server such as ``vllm serve``, by default on vLLM's port.

    The optional API key is what the server was started with (``vllm serve --api-key``).
    """

    paths: ClassVar[frozenset[str]] = OPENAI_PATHS | ANTHROPIC_PATHS
    default_url: ClassVar[str] = "http://127.0.0.1:8000"

    @property
    def base_url(self) -> str:
        """The server's root, also when given as the OpenAI base URL.

        Users often paste ``http://host:8000/v1`` because that is what OpenAI clients want; the
        public paths already start with ``/v1``, so the suffix is dropped rather than doubled.
        """
        return super().base_url.removesuffix("/v1")

    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        """The ids in ``GET /v1/models``: what the server was started to serve."""
        url = self.base_url + "/v1/models"
        return _ids(await fetch_json(http, url, headers=self.auth_headers()), url)


def _ids(data: Any, url: str) -> list[str]:
    """Model ids out of an OpenAI model list, or a :class:`BackendError` saying what is wrong."""
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in models
    ):
        raise BackendError(f"GET {url} did not answer an OpenAI model list")
    return [m["id"] for m in models]
