"""The Open WebUI backend for llamapool workers.

Open WebUI puts its own API in front of the runtimes it is connected to, at paths of its own
and always behind a bearer key (an API key from Settings > Account). This backend maps the
public paths onto those routes and sends the key; request and response bytes go through
unchanged. Ollama's native paths reach Open WebUI's Ollama proxy for its Ollama models only;
for the others (OpenAI connections, pipes) the worker translates them to OpenAI chat and
embeddings. The plugin imports only :mod:`llamapool.plugin_api`, like any third-party backend,
and is found through the ``llamapool.backends`` entry point ``openwebui``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from llamapool.plugin_api import OLLAMA_PATHS, Backend, BackendError, BackendSettings, fetch_json

if TYPE_CHECKING:
    from collections.abc import Container

    import aiohttp

__all__ = ["OpenWebUIBackend"]

#: Open WebUI's route for each public path it can serve. Routes as declared in open-webui's
#: ``backend/open_webui/main.py`` and ``backend/open_webui/routers/ollama.py`` (the latter is
#: mounted under ``/ollama``) and documented at docs.openwebui.com, "API Endpoints".
_UPSTREAM_PATHS: dict[str, str] = {
    # OpenAI chat, for every model Open WebUI knows (Ollama, OpenAI connections, functions).
    "/v1/chat/completions": "/api/chat/completions",
    # OpenAI-compatible embeddings for any provider (open-webui PR #14667, released in 0.6.x);
    # an older Open WebUI answers 404 or 405 here.
    "/v1/embeddings": "/api/embeddings",
    # Open WebUI has no top-level text-completions route; its Ollama proxy forwards OpenAI text
    # completions to Ollama's /v1/completions, so this works for Ollama-backed models only,
    # exactly like the native paths below.
    "/v1/completions": "/ollama/v1/completions",
    # Ollama's native API, passed through by Open WebUI's Ollama proxy.
    "/api/generate": "/ollama/api/generate",
    "/api/chat": "/ollama/api/chat",
    "/api/embed": "/ollama/api/embed",
    "/api/embeddings": "/ollama/api/embeddings",
    "/api/show": "/ollama/api/show",
}


class OpenWebUIBackend(Backend):
    """An Open WebUI instance, by default on the port its docs use."""

    paths: ClassVar[frozenset[str]] = frozenset(_UPSTREAM_PATHS)
    default_url: ClassVar[str] = "http://127.0.0.1:3000"

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        #: The models Open WebUI has from an Ollama connection, as of the last listing.
        self.ollama_models: frozenset[str] = frozenset()

    def native_models(self, path: str) -> Container[str] | None:
        """Open WebUI's Ollama proxy serves its Ollama models only (``owned_by: ollama``)."""
        return self.ollama_models if path in OLLAMA_PATHS else None

    def upstream_url(self, path: str) -> str:
        """Open WebUI's URL for a public path: its own chat route or its Ollama proxy."""
        try:
            return self.base_url + _UPSTREAM_PATHS[path]
        except KeyError:
            raise BackendError(f"the openwebui backend does not serve {path}") from None

    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        """The ids in ``GET /api/models``: every model the key's user may use."""
        if not self.settings.api_key:
            raise BackendError(
                "Open WebUI needs an API key: create one under Settings > Account in Open WebUI "
                "and set it as the backend API key"
            )
        url = self.base_url + "/api/models"
        data = await fetch_json(http, url, headers=self.auth_headers())
        ids = _ids(data, url)
        self.ollama_models = frozenset(
            m["id"] for m in data["data"] if m.get("owned_by") == "ollama"
        )
        return ids


def _ids(data: Any, url: str) -> list[str]:
    """Model ids out of an ``/api/models`` body, or a :class:`BackendError` saying what is wrong."""
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in models
    ):
        raise BackendError(f"GET {url} did not answer an Open WebUI model list")
    return [m["id"] for m in models]
