"""Ollama native requests as OpenAI requests: which OpenAI path stands in, and the body to send.

Every field is either mapped to its OpenAI counterpart, ignored because it does not change the
answer (``keep_alive``, ``num_ctx`` and other resource settings), or refused with a
:class:`TranslationError` (a 400 for the client) because the answer would silently differ.
Fields Ollama itself does not know are ignored, as Ollama ignores them.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import Any

import attrs
import orjson

from llamapool.errors import LlamapoolError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

#: Each Ollama path, and the OpenAI paths that can stand in for it.
COUNTERPARTS: dict[str, tuple[str, ...]] = {
    "/api/chat": (CHAT,),
    "/api/generate": (CHAT, COMPLETIONS),
    "/api/embed": (EMBEDDINGS,),
    "/api/embeddings": (EMBEDDINGS,),
}


class TranslationError(LlamapoolError):
    """An Ollama request that cannot be put in OpenAI's terms without changing its answer."""


class Kind(enum.Enum):
    """Which Ollama endpoint a request came to, and so the shape of its answer."""

    CHAT = "chat"
    GENERATE = "generate"
    EMBED = "embed"
    EMBEDDINGS = "embeddings"


_KINDS = {
    "/api/chat": Kind.CHAT,
    "/api/generate": Kind.GENERATE,
    "/api/embed": Kind.EMBED,
    "/api/embeddings": Kind.EMBEDDINGS,
}


@attrs.frozen
class Plan:
    """How to serve one Ollama request from an OpenAI backend."""

    kind: Kind
    #: The model named in the answer (the one the backend was asked for).
    model: str
    #: Whether the client wants NDJSON (Ollama streams unless told not to).
    stream: bool
    #: The OpenAI path to call, and the body to send it.
    upstream: str = ""
    body: bytes = b""
    #: Whether the client asked for no thinking (``think: false``): reasoning is left out.
    hide_thinking: bool = False
    #: Set when the worker answers itself (a load request, an empty input): the answer.
    local: dict[str, Any] | None = None


def translatable(served: Collection[str]) -> frozenset[str]:
    """The Ollama paths a backend serving the ``served`` OpenAI paths can answer through us."""
    return frozenset(p for p, alts in COUNTERPARTS.items() if any(a in served for a in alts))


def plan(path: str, body: bytes, *, served: Collection[str], model: str = "") -> Plan:
    """The OpenAI call that answers an Ollama request to ``path``.

    ``served`` is what the backend serves; ``model`` (when set) replaces the body's model,
    as when the server routed the request through an alias. Raises :class:`TranslationError`.
    """
    kind = _KINDS.get(path)
    if kind is None:
        raise TranslationError(f"{path} cannot be translated")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TranslationError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise TranslationError("the request body must be a JSON object")
    model = model or data.get("model") or ""
    if not isinstance(model, str) or not model:
        raise TranslationError("model is required")
    if kind is Kind.CHAT:
        return _chat(data, model, served)
    if kind is Kind.GENERATE:
        return _generate(data, model, served)
    return _embed(data, model, kind)


# --- chat and generate ----------------------------------------------------------------------

#: Ollama options with the same name and meaning in OpenAI's (or vLLM's and llama.cpp's) API.
_SAME_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty",
                 "presence_penalty")  # fmt: skip
#: Ollama options under another name. vLLM calls the multiplicative repeat penalty
#: ``repetition_penalty`` (and applies it to the whole sequence, not the last
#: ``repeat_last_n`` tokens).
_RENAMED_OPTIONS = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}
#: Options about the runtime's resources or defaults that do not change which answer is drawn;
#: the backend's own settings (its context length, for ``num_ctx``) apply.
_IGNORED_OPTIONS = frozenset(
    [
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_keep",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "rope_frequency_base",
        "rope_frequency_scale",
        "penalize_newline",
        "repeat_last_n",
        "mirostat_tau",
        "mirostat_eta",
    ]
)
#: Options with no OpenAI counterpart, and the value that turns each off (accepted).
_UNMAPPABLE_OPTIONS: dict[str, float] = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
#: Top-level fields that cannot be translated unless empty.
_UNMAPPABLE_FIELDS = ("context", "template", "logprobs", "top_logprobs", "width", "height",
                      "steps")  # fmt: skip


def _chat(data: dict[str, Any], model: str, served: Collection[str]) -> Plan:
    stream = data.get("stream") is not False
    messages = data.get("messages")
    if not messages:
        return Plan(Kind.CHAT, model, stream, local=_loaded(Kind.CHAT))
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TranslationError("messages must be a list of objects")
    _refuse(data, "logprobs", "top_logprobs")
    out: dict[str, Any] = {"model": model, "messages": _messages(messages)}
    tools = data.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise TranslationError("tools must be a list")
        out["tools"] = tools  # Ollama's tools are OpenAI's function tools
    return _sampled(Kind.CHAT, CHAT, data, out, model, stream, served)


def _generate(data: dict[str, Any], model: str, served: Collection[str]) -> Plan:
    stream = data.get("stream") is not False
    prompt = _string(data, "prompt")
    system = _string(data, "system")
    suffix = _string(data, "suffix")
    images = data.get("images")
    _refuse(data, *_UNMAPPABLE_FIELDS)
    raw = data.get("raw") is True
    if not (prompt or system or images or suffix):
        return Plan(Kind.GENERATE, model, stream, local=_loaded(Kind.GENERATE))
    if raw or suffix:
        # No template (raw) or the runtime's fill-in-the-middle (suffix): a text completion.
        if images:
            raise TranslationError("images cannot be sent with raw or suffix")
        out: dict[str, Any] = {"model": model, "prompt": prompt}
        if suffix:
            out["suffix"] = suffix
        return _sampled(Kind.GENERATE, COMPLETIONS, data, out, model, stream, served)
    # Ollama applies the model's chat template to a prompt: a one-turn chat.
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt, "images": images})
    out = {"model": model, "messages": _messages(messages)}
    return _sampled(Kind.GENERATE, CHAT, data, out, model, stream, served)


def _sampled(
    kind: Kind,
    upstream: str,
    data: dict[str, Any],
    out: dict[str, Any],
    model: str,
    stream: bool,
    served: Collection[str],
) -> Plan:
    """Add the stream, sampling options, format and thinking to ``out``; the plan."""
    if upstream not in served:
        need = "a text completion (raw or suffix)" if upstream == COMPLETIONS else "a chat"
        raise TranslationError(f"this model's backend cannot serve {need} ({upstream})")
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    out.update(_options(data.get("options")))
    response_format = _format(data.get("format"))
    if response_format is not None:
        out["response_format"] = response_format
    think = data.get("think")
    if isinstance(think, str) and think:
        out["reasoning_effort"] = think
    elif think is False and upstream == CHAT:
        out["chat_template_kwargs"] = {"enable_thinking": False}
    elif think is not None and not isinstance(think, (bool, str)):
        raise TranslationError("think must be a boolean or high, medium or low")
    body = orjson.dumps(out)
    return Plan(kind, model, stream, upstream, body, hide_thinking=think is False)


def _options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TranslationError("options must be an object")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or name in _IGNORED_OPTIONS:
            continue
        if name in _SAME_OPTIONS:
            out[name] = value
        elif name in _RENAMED_OPTIONS:
            if name == "num_predict" and isinstance(value, int) and value < 0:
                continue  # -1 (no limit) and -2 (fill the context): the backend's default
            out[_RENAMED_OPTIONS[name]] = value
        elif name == "stop":
            out["stop"] = [value] if isinstance(value, str) else value
        elif name in _UNMAPPABLE_OPTIONS and value != _UNMAPPABLE_OPTIONS[name]:
            raise TranslationError(
                f"option {name} has no counterpart on this model's backend (an "
                "OpenAI-compatible server); leave it unset"
            )
        # any other option is unknown to Ollama too, which ignores it
    return out


def _format(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    raise TranslationError('format must be "json" or a JSON schema')


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages in OpenAI's shape: images as content parts, tool call arguments as
    JSON text, and each tool result tied to the call it answers."""
    out: list[dict[str, Any]] = []
    calls: list[tuple[str, str]] = []  # (id, name) of the last assistant's unanswered calls
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise TranslationError("a message's content must be a string")
        item: dict[str, Any] = {"role": role, "content": _content(content, message.get("images"))}
        tool_calls = message.get("tool_calls")
        if tool_calls:
            item["tool_calls"] = _tool_calls(tool_calls, len(out))
            calls = [(c["id"], c["function"]["name"]) for c in item["tool_calls"]]
        if role == "tool":
            item["tool_call_id"] = _answered(message, calls, len(out))
        out.append(item)
    return out


def _tool_calls(tool_calls: Any, position: int) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise TranslationError("tool_calls must be a list")
    out = []
    for i, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TranslationError("each tool call needs a function with a name")
        arguments = function.get("arguments") or {}
        text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
        call_id = call.get("id") or f"call_{position}_{i}"
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function["name"], "arguments": text},
            }
        )
    return out


def _answered(message: dict[str, Any], calls: list[tuple[str, str]], position: int) -> str:
    """The id of the call a tool message answers: its own, the first call of its
    ``tool_name``, or the next unanswered one."""
    own = message.get("tool_call_id")
    if isinstance(own, str) and own:
        calls[:] = [c for c in calls if c[0] != own]
        return own
    name = message.get("tool_name")
    for i, (call_id, call_name) in enumerate(calls):
        if not name or call_name == name:
            del calls[i]
            return call_id
    return f"call_{position}"


def _content(text: str, images: Any) -> str | list[dict[str, Any]]:
    if not images:
        return text
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise TranslationError("images must be a list of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
    return parts


#: The base64 openings of the image formats multimodal runtimes read.
_IMAGE_TYPES = (
    ("iVBORw0KGgo", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
    ("Qk", "image/bmp"),
)


def _data_url(image: str) -> str:
    if image.startswith("data:"):
        return image
    kind = next((t for prefix, t in _IMAGE_TYPES if image.startswith(prefix)), "image/jpeg")
    return f"data:{kind};base64,{image}"


# --- embeddings -----------------------------------------------------------------------------


def _embed(data: dict[str, Any], model: str, kind: Kind) -> Plan:
    if kind is Kind.EMBEDDINGS:
        prompt = _string(data, "prompt")
        if not prompt:
            return Plan(kind, model, False, local={"embedding": []})
        texts: str | list[str] = prompt
    else:
        value = data.get("input")
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            texts = value
        elif value is None:
            texts = []
        else:
            raise TranslationError("input must be a string or a list of strings")
        if not texts:
            return Plan(kind, model, False, local={"model": model, "embeddings": []})
    out: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
    dimensions = data.get("dimensions")
    if dimensions:
        out["dimensions"] = dimensions
    return Plan(kind, model, False, EMBEDDINGS, orjson.dumps(out))


# --- helpers --------------------------------------------------------------------------------


def _string(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TranslationError(f"{field} must be a string")
    return value


def _refuse(data: dict[str, Any], *fields: str) -> None:
    for field in fields:
        if data.get(field):
            raise TranslationError(
                f"{field} cannot be translated for this model's backend (an OpenAI-compatible "
                "server); leave it unset"
            )


def _loaded(kind: Kind) -> dict[str, Any]:
    """What Ollama answers a request with nothing to generate (it loads the model)."""
    if kind is Kind.CHAT:
        return {"message": {"role": "assistant", "content": ""}, "done_reason": "load"}
    return {"response": "", "done_reason": "load"}
