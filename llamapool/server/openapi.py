"""The OpenAPI 3.1 document of the server's HTTP API, served at ``GET /openapi.json``.

It describes what this server itself answers: the relayed routes check only ``model`` and
``stream`` and pass every other field to the backend unchanged, and a backend's own answer
(status and body) comes back as it was sent. The document follows the configuration: the API
key appears only when one is set, ``/metrics`` only when it is served on this port.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamapool.build import build_info
from llamapool.config import ServeConfig
from llamapool.server.appkeys import CONFIG
from llamapool.server.http_errors import Flavor, json_response
from llamapool.server.ollama import MANAGEMENT
from llamapool.server.routes import MODEL_ROUTES, Body

Schema = dict[str, Any]

_OPENAI_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ANTHROPIC_ERROR: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
_OLLAMA_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_MODEL: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string", "description": "The names of the workers serving it."},
    },
}
_SCHEMAS: dict[str, Schema] = {
    "OpenAIError": _OPENAI_ERROR,
    "OllamaError": _OLLAMA_ERROR,
    "AnthropicError": _ANTHROPIC_ERROR,
    "ModelRequest": {
        "type": "object",
        "description": "Only 'model' and 'stream' are checked; every field reaches the backend.",
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "stream": {"type": "boolean"},
        },
        "additionalProperties": True,
    },
    "ModelForm": {
        "type": "object",
        "description": "A multipart form: only the text field 'model' (and 'stream') is read; "
        "the body, boundary and uploads included, reaches the backend byte for byte.",
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "pattern": "\\S"},
            "file": {"type": "string", "contentMediaType": "application/octet-stream"},
        },
        "additionalProperties": True,
    },
    "Version": {
        "type": "object",
        "required": ["version"],
        "properties": {"version": {"type": "string"}},
    },
    "Model": _MODEL,
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "Tags": {
        "type": "object",
        "required": ["models"],
        "properties": {
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "model", "modified_at", "size", "digest", "details"],
                    "properties": {
                        "name": {"type": "string"},
                        "model": {"type": "string"},
                        "modified_at": {"type": "string"},
                        "size": {"type": "integer"},
                        "digest": {"type": "string"},
                        "details": {"type": "object"},
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "workers"],
        "properties": {"status": {"const": "ok"}, "workers": {"type": "integer", "minimum": 0}},
    },
    "State": {
        "type": "object",
        "description": "The Go llamapool's /api/v1/state document.",
        "required": ["server", "workers_summary", "models", "workers"],
        "properties": {
            "server": {"type": "object"},
            "workers_summary": {"type": "object"},
            "models": {"type": "array"},
            "workers": {"type": "array"},
        },
    },
}

#: What each error status means, by the code that answers it.
_ERRORS = {
    400: "The body is not JSON (a form on multipart routes; or not in its Content-Encoding), "
    "not an object, or has no non-empty string 'model' or a non-boolean 'stream' "
    "(code 'invalid_request').",
    401: "Missing or wrong API key (code 'invalid_api_key').",
    403: "The pool does not manage models: pull, push, create, copy and delete are done on "
    "the workers' own runtimes.",
    404: "No connected worker serves the model (code 'model_not_found').",
    405: "The path exists but not with this method; the Allow header names the methods.",
    413: "The body is larger than the limit of {limit} bytes.",
    429: "Every worker for the model is busy and its queue is full (code 'queue_full').",
    502: "The worker failed and no other could serve the request (code 'worker_error').",
    503: "The server is at its connection limit ('overloaded'), or the request waited in "
    "the queue too long ('queue_timeout').",
    504: "The worker did not answer in time (code 'timeout').",
}
_RELAY_ERRORS = (400, 404, 413, 429, 502, 503, 504)


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


class _Builder:
    """The paths of one configuration."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.paths: dict[str, dict[str, Schema]] = {}

    def errors(
        self, statuses: tuple[int, ...], *, ollama: bool, anthropic: bool = False
    ) -> dict[str, Schema]:
        error = _ref("OllamaError" if ollama else "AnthropicError" if anthropic else "OpenAIError")
        limit = self.cfg.max_body_size
        return {str(s): _json(error, _ERRORS[s].format(limit=limit)) for s in statuses}

    def add(
        self,
        method: str,
        path: str,
        summary: str,
        ok: Schema | None,
        *,
        protected: bool,
        errors: tuple[int, ...] = (503,),
        ollama: bool = False,
        anthropic: bool = False,
        body: bool = False,
        form: bool = False,
        parameters: list[Schema] | None = None,
    ) -> None:
        secured = protected and bool(self.cfg.api_keys)
        statuses = tuple(sorted({*errors, *((401,) if secured else ())}))
        responses = {
            **({"200": ok} if ok is not None else {}),
            **self.errors(statuses, ollama=ollama, anthropic=anthropic),
        }
        operation: Schema = {
            "summary": summary,
            "security": [{"bearer": []}] if secured else [],
            "responses": responses,
        }
        if parameters:
            operation["parameters"] = parameters
        if body:
            media, schema = (
                ("multipart/form-data", "ModelForm")
                if form
                else ("application/json", "ModelRequest")
            )
            operation["requestBody"] = {
                "required": True,
                "content": {media: {"schema": _ref(schema)}},
            }
            responses["default"] = {
                "description": "Any other status the backend answered, relayed unchanged."
            }
        self.paths.setdefault(path, {})[method] = operation

    def relay(
        self, path: str, summary: str, *, flavor: Flavor, stream: bool, form: bool = False
    ) -> None:
        ollama = flavor is Flavor.OLLAMA
        stream_type = "application/x-ndjson" if ollama else "text/event-stream"
        ok = {
            "description": "The backend's answer, relayed unchanged ("
            + ("streamed unless 'stream' is false)." if stream else "streamed if 'stream')."),
            "content": {
                "application/json": {"schema": {"type": "object"}},
                stream_type: {"schema": {"type": "string"}},
            },
        }
        self.add(
            "post",
            path,
            summary,
            ok,
            protected=True,
            errors=_RELAY_ERRORS,
            ollama=ollama,
            anthropic=flavor is Flavor.ANTHROPIC,
            body=True,
            form=form,
        )


def build_document(cfg: ServeConfig) -> Schema:
    """The OpenAPI document of a server running with ``cfg``."""
    b = _Builder(cfg)
    b.add("get", "/healthz", "The process is up.", _json(_ref("Health"), "Up."), protected=False)
    b.add(
        "get",
        "/openapi.json",
        "This document.",
        _json({"type": "object"}, "OpenAPI 3.1."),
        protected=False,
    )
    if cfg.metrics_port is None:
        text = {"description": "Prometheus text format.", "content": {"text/plain": {}}}
        b.add("get", "/metrics", "Prometheus metrics.", text, protected=cfg.metrics_require_key)
    b.add(
        "get",
        "/api/v1/state",
        "The whole pool.",
        _json(_ref("State"), "The pool state."),
        protected=True,
    )
    sse = {
        "description": "A snapshot now, then one per change.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    b.add(
        "get", "/api/v1/state/stream", "The pool state as server-sent events.", sse, protected=True
    )
    b.add(
        "get",
        "/v1/models",
        "Every model a connected worker serves.",
        _json(_ref("ModelList"), "The models."),
        protected=True,
    )
    model_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "May hold ':' and '/'; an alias such as 'llama3:8b-q4_0' resolves.",
        "schema": {"type": "string", "minLength": 1},
    }
    b.add(
        "get",
        "/v1/models/{id}",
        "One model.",
        _json(_ref("Model"), "The model."),
        protected=True,
        errors=(404, 503),
        parameters=[model_id],
    )
    b.add(
        "get",
        "/api/tags",
        "Every model a connected worker serves, Ollama's way.",
        _json(_ref("Tags"), "The models."),
        protected=True,
        ollama=True,
    )
    for route in MODEL_ROUTES:
        b.relay(
            route.path,
            route.summary,
            flavor=route.flavor,
            stream=route.stream_default,
            form=route.body is Body.MULTIPART,
        )
    b.add(
        "get",
        "/api/version",
        "The Ollama version the pool answers as (no key, as on Ollama).",
        _json(_ref("Version"), "The version."),
        protected=False,
        ollama=True,
    )
    b.add(
        "get",
        "/api/ps",
        "The models Ollama backends hold in memory and those with requests in flight, merged.",
        _json(_ref("Tags"), "The models."),
        protected=True,
        ollama=True,
    )
    for method, path in MANAGEMENT:
        b.add(
            method.lower(),
            path,
            "Not available: the pool does not manage models.",
            None,
            protected=True,
            errors=(403,),
            ollama=True,
        )
    probe = {
        "description": "'Ollama is running' (a browser asking for text/html is redirected "
        "to the dashboard).",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    b.add("get", "/", "Ollama's probe answer.", probe, protected=False, errors=())
    limit = cfg.max_body_size
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llamapool",
            "version": build_info().version,
            "description": "Private LLM machines pooled behind one OpenAI- and "
            "Ollama-compatible endpoint. Every error is JSON: OpenAI's shape on /v1 and "
            "llamapool's own routes, Anthropic's on /v1/messages, Ollama's under /api (except "
            "/api/v1). An unknown path answers 404, a known path with another method 405.",
        },
        "paths": b.paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "MethodNotAllowed": _json(_ref("OpenAIError"), _ERRORS[405]),
                "PayloadTooLarge": _json(_ref("OpenAIError"), _ERRORS[413].format(limit=limit)),
            },
        },
    }


async def document(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the document of this server (no key needed)."""
    return json_response(build_document(request.app[CONFIG]))
