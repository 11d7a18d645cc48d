"""Error bodies in the shape each API's clients expect.

OpenAI SDKs read ``{"error": {"message", "type", "code"}}``; Anthropic SDKs read
``{"type": "error", "error": {"type", "message"}}``; Ollama clients read ``{"error": "..."}``;
llamapool's own routes use the OpenAI shape.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson
from aiohttp import web


class Flavor(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    ANTHROPIC = "anthropic"
    LLAMAPOOL = "llamapool"


#: Paths of the Anthropic Messages API (and everything under them).
ANTHROPIC_PREFIX = "/v1/messages"


def flavor_for(path: str) -> Flavor:
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return Flavor.ANTHROPIC
    if path.startswith("/api/") and not path.startswith("/api/v1/"):
        return Flavor.OLLAMA
    if path.startswith("/v1/"):
        return Flavor.OPENAI
    return Flavor.LLAMAPOOL


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

#: Anthropic's error types, by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_response(
    flavor: Flavor,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: Any
    if flavor is Flavor.OLLAMA:
        body = {"error": message}
    elif flavor is Flavor.ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = _OPENAI_TYPES.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "code": code}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def json_response(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
