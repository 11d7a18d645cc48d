"""Deterministic echo answers in OpenAI and Ollama shapes.

The demo backend and the fake backends in :mod:`llamapool.testing` answer with these, so a pool
with no LLM installed still streams real-looking, checkable replies: the answer repeats the
prompt, its tokens are whitespace-separated words, and usage counts them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import attrs


@attrs.frozen
class Echo:
    """The answer to one prompt: its tokens and the usage to report."""

    tokens: list[str]
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


#: Most tokens one answer has, whatever ``max_tokens`` a client asks for.
MAX_TOKENS = 100_000


def echo(prompt: str, *, limit: int | None = None) -> Echo:
    """Answer ``"echo: " + prompt``; with ``limit``, exactly that many tokens (cycling, at
    most :data:`MAX_TOKENS`)."""
    words = ["echo:", *prompt.split()]
    if limit is not None and limit > 0:
        words = [words[i % len(words)] for i in range(min(limit, MAX_TOKENS))]
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return Echo(tokens=tokens, prompt_tokens=len(prompt.split()))


def embedding(text: str, *, dims: int = 8) -> list[float]:
    """A unit-free, deterministic vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 6) for b in digest[:dims]]


# --- prompts out of request bodies ----------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def chat_prompt(body: dict[str, Any]) -> str:
    """The last user message of an OpenAI or Ollama chat request."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def inputs(value: Any) -> list[str]:
    """Embedding or completion input: a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v if isinstance(v, str) else str(v) for v in value]
    return []


# --- OpenAI shapes --------------------------------------------------------------------------


def openai_usage(answer: Echo) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def openai_chat(model: str, answer: Echo, *, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": "stop",
            }
        ],
        "usage": openai_usage(answer),
    }


def openai_completion(model: str, answer: Echo, *, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": answer.text, "logprobs": None, "finish_reason": "stop"}],
        "usage": openai_usage(answer),
    }


def openai_stream(
    model: str, answer: Echo, *, rid: str, chat: bool, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """The SSE events of a streamed chat or text completion (without ``[DONE]``)."""
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(piece: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

    for i, token in enumerate(answer.tokens):
        yield event(token, None, first=i == 0)
    yield event(None, "stop")
    if include_usage:
        yield {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [],
            "usage": openai_usage(answer),
        }


def openai_embeddings(model: str, texts: list[str]) -> dict[str, Any]:
    count = sum(len(t.split()) for t in texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embedding(t)}
            for i, t in enumerate(texts)
        ],
        "model": model,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }


def openai_models(models: list[str]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "demo"} for m in models],
    }


# --- Ollama shapes --------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ollama_stream(model: str, answer: Echo, *, chat: bool) -> Iterator[dict[str, Any]]:
    """The NDJSON lines of a streamed ``/api/chat`` or ``/api/generate`` answer."""
    for token in answer.tokens:
        yield _ollama_line(model, token, chat=chat, done=False)
    yield ollama_final(model, answer, chat=chat, text="")


def ollama_final(model: str, answer: Echo, *, chat: bool, text: str) -> dict[str, Any]:
    """The ``done`` line (or whole non-streamed body) with Ollama's usage counters."""
    line = _ollama_line(model, text, chat=chat, done=True)
    line.update(
        done_reason="stop",
        total_duration=1000,
        load_duration=0,
        prompt_eval_count=answer.prompt_tokens,
        prompt_eval_duration=500,
        eval_count=answer.completion_tokens,
        eval_duration=500,
    )
    return line


def _ollama_line(model: str, text: str, *, chat: bool, done: bool) -> dict[str, Any]:
    line: dict[str, Any] = {"model": model, "created_at": _now()}
    if chat:
        line["message"] = {"role": "assistant", "content": text}
    else:
        line["response"] = text
    line["done"] = done
    return line


def ollama_embed(model: str, texts: list[str]) -> dict[str, Any]:
    return {
        "model": model,
        "embeddings": [embedding(t) for t in texts],
        "total_duration": 1000,
        "load_duration": 0,
        "prompt_eval_count": sum(len(t.split()) for t in texts),
    }


def ollama_tags(models: list[str]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": m,
                "model": m,
                "modified_at": "2026-01-01T00:00:00Z",
                "size": 0,
                "digest": hashlib.sha256(m.encode()).hexdigest(),
                "details": {"format": "gguf", "family": "demo", "parameter_size": "0B"},
            }
            for m in models
        ]
    }
