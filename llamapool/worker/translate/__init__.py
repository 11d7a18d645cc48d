"""Ollama's native API for models whose backend speaks only OpenAI's.

When a client calls ``/api/chat``, ``/api/generate``, ``/api/embed`` or ``/api/embeddings`` and
the worker's backend serves the OpenAI counterpart but not the path itself (vLLM, llama.cpp's
server, Open WebUI's non-Ollama models), the worker translates: :func:`plan` turns the Ollama
request into an OpenAI one, and a :class:`Reply` turns the OpenAI answer (whole, streamed as
server-sent events, or an error) back into Ollama's. Pure functions of bytes and dicts: the
worker's job loop does the I/O. The mapping table is in the README ("Ollama's API on every
backend").
"""

from __future__ import annotations

from llamapool.worker.translate._request import (
    COUNTERPARTS,
    Kind,
    Plan,
    TranslationError,
    plan,
    translatable,
)
from llamapool.worker.translate._response import (
    JSON,
    NDJSON,
    BadAnswer,
    Reply,
    error_body,
    error_message,
)
from llamapool.worker.translate._sse import SSEParser

__all__ = [
    "COUNTERPARTS",
    "JSON",
    "NDJSON",
    "BadAnswer",
    "Kind",
    "Plan",
    "Reply",
    "SSEParser",
    "TranslationError",
    "error_body",
    "error_message",
    "plan",
    "translatable",
]
