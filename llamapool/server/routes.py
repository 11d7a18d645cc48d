"""Every model endpoint the server relays, as data.

One table says, for each public path, which API's shape its errors take, whether it streams
when the body does not say, and how its body names the model. ``create_app`` registers a
route for each row, the relay reads the row, and the OpenAPI document lists them. Which
worker may serve a path is the backend's word (``Backend.paths`` in the plugin API).
"""

from __future__ import annotations

import enum

import attrs

from llamapool.server.http_errors import Flavor


class Body(enum.Enum):
    """How a request body carries its ``model`` (and ``stream``)."""

    JSON = "json"
    #: ``multipart/form-data`` with text fields beside the upload (audio, image edits).
    MULTIPART = "multipart"


@attrs.frozen
class ModelRoute:
    """One relayed endpoint: ``POST path`` routed by the body's model."""

    path: str
    flavor: Flavor
    summary: str
    #: Whether the answer streams when the body has no ``stream`` field.
    stream_default: bool = False
    body: Body = Body.JSON
    #: Body fields that may name the model, first present wins (old Ollama clients send
    #: ``name`` to ``/api/show``).
    model_fields: tuple[str, ...] = ("model",)


def _openai(path: str, summary: str, body: Body = Body.JSON) -> ModelRoute:
    return ModelRoute(path, Flavor.OPENAI, f"OpenAI {summary}.", body=body)


MODEL_ROUTES: tuple[ModelRoute, ...] = (
    _openai("/v1/chat/completions", "chat completion"),
    _openai("/v1/completions", "text completion"),
    _openai("/v1/embeddings", "embeddings"),
    _openai("/v1/responses", "Responses API"),
    _openai("/v1/rerank", "rerank (vLLM, llama.cpp, Jina, Cohere v1 shape)"),
    # /rerank has no /v1 prefix: its errors take the pool's own (OpenAI) shape all the same.
    _openai("/rerank", "rerank, as vLLM and llama.cpp also spell it"),
    _openai("/v1/score", "score (vLLM)"),
    _openai("/v1/audio/transcriptions", "audio transcription (multipart)", Body.MULTIPART),
    _openai("/v1/audio/translations", "audio translation (multipart)", Body.MULTIPART),
    _openai("/v1/audio/speech", "text to speech"),
    _openai("/v1/images/generations", "image generation"),
    _openai("/v1/images/edits", "image edit (multipart)", Body.MULTIPART),
    ModelRoute("/v1/messages", Flavor.ANTHROPIC, "Anthropic Messages API."),
    ModelRoute("/v1/messages/count_tokens", Flavor.ANTHROPIC, "Anthropic token count."),
    ModelRoute("/api/generate", Flavor.OLLAMA, "Ollama generate.", stream_default=True),
    ModelRoute("/api/chat", Flavor.OLLAMA, "Ollama chat.", stream_default=True),
    ModelRoute("/api/embed", Flavor.OLLAMA, "Ollama embeddings."),
    ModelRoute("/api/embeddings", Flavor.OLLAMA, "Ollama embeddings (the older endpoint)."),
    ModelRoute(
        "/api/show",
        Flavor.OLLAMA,
        "Ollama model details: relayed to an Ollama worker, else described by the pool.",
        model_fields=("model", "name"),
    ),
)

BY_PATH = {route.path: route for route in MODEL_ROUTES}
