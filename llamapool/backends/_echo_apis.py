"""Echo answers for the newer APIs: OpenAI Responses, Anthropic Messages, rerank and score,
audio and images, and Ollama's model details.

Like :mod:`llamapool.backends._echo`, every answer is deterministic and in the shape the
official clients parse, so the demo runtime and the fakes show each path working.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

from llamapool.backends._echo import Echo, embedding

# --- OpenAI Responses -----------------------------------------------------------------------


def responses_prompt(body: dict[str, Any]) -> str:
    """The text of a Responses request: its ``input`` string or last user message."""
    value = body.get("input")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role", "user") == "user":
                content = item.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _responses_usage(answer: Echo) -> dict[str, Any]:
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": answer.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def response_id() -> str:
    """A new response id, unique across workers as OpenAI's and vLLM's are (the pool routes a
    follow-up by it)."""
    return f"resp_{uuid.uuid4().hex}"


def _message(answer: Echo, *, rid: str, done: bool) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{rid}",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_text_part(answer.text)] if done else [],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def response(
    model: str, answer: Echo, *, rid: str, done: bool = True, previous: str | None = None
) -> dict[str, Any]:
    """A ``response`` object (``done=False``: as ``response.created`` announces it)."""
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if done else "in_progress",
        "model": model,
        "output": [_message(answer, rid=rid, done=True)] if done else [],
        "previous_response_id": previous,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _responses_usage(answer) if done else None,
    }


def response_events(
    model: str, answer: Echo, *, rid: str, previous: str | None = None
) -> Iterator[dict[str, Any]]:
    """The typed events of a streamed Responses answer, in the order OpenAI sends them."""
    seq = iter(range(1_000_000))
    started = response(model, answer, rid=rid, done=False, previous=previous)
    where = {"item_id": f"msg_{rid}", "output_index": 0}
    yield {"type": "response.created", "sequence_number": next(seq), "response": started}
    yield {"type": "response.in_progress", "sequence_number": next(seq), "response": started}
    yield {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
           "item": _message(answer, rid=rid, done=False)}  # fmt: skip
    yield {"type": "response.content_part.added", "sequence_number": next(seq), **where,
           "content_index": 0, "part": _text_part("")}  # fmt: skip
    for token in answer.tokens:
        yield {"type": "response.output_text.delta", "sequence_number": next(seq), **where,
               "content_index": 0, "delta": token, "logprobs": []}  # fmt: skip
    yield {"type": "response.output_text.done", "sequence_number": next(seq), **where,
           "content_index": 0, "text": answer.text, "logprobs": []}  # fmt: skip
    yield {"type": "response.content_part.done", "sequence_number": next(seq), **where,
           "content_index": 0, "part": _text_part(answer.text)}  # fmt: skip
    yield {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0,
           "item": _message(answer, rid=rid, done=True)}  # fmt: skip
    yield {"type": "response.completed", "sequence_number": next(seq),
           "response": response(model, answer, rid=rid, previous=previous)}  # fmt: skip


def input_items(rid: str, prompt: str) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items``: the request's input, as one user message."""
    item = {
        "type": "message",
        "id": f"msg_in_{rid}",
        "role": "user",
        "content": [{"type": "input_text", "text": prompt}],
    }
    return {"object": "list", "data": [item], "first_id": item["id"], "last_id": item["id"],
            "has_more": False}  # fmt: skip


def deleted(rid: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "deleted": True}


# --- Anthropic Messages ---------------------------------------------------------------------


def message(model: str, answer: Echo, *, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": answer.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens},
    }


def message_events(model: str, answer: Echo, *, rid: str) -> Iterator[dict[str, Any]]:
    """The events of a streamed Messages answer, ``message_start`` to ``message_stop``."""
    start = {**message(model, answer, rid=rid), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": answer.prompt_tokens, "output_tokens": 0}
    yield {"type": "message_start", "message": start}
    yield {"type": "content_block_start", "index": 0,
           "content_block": {"type": "text", "text": ""}}  # fmt: skip
    for token in answer.tokens:
        yield {"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": token}}  # fmt: skip
    yield {"type": "content_block_stop", "index": 0}
    yield {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
           "usage": {"output_tokens": answer.completion_tokens}}  # fmt: skip
    yield {"type": "message_stop"}


def count_tokens(prompt: str) -> dict[str, Any]:
    return {"input_tokens": len(prompt.split())}


# --- rerank and score -----------------------------------------------------------------------


def _score(query: str, document: str) -> float:
    """How many of the query's words the document holds, as a share of them."""
    words = set(query.lower().split())
    return round(len(words & set(document.lower().split())) / len(words), 6) if words else 0.0


def _doc_text(document: Any) -> str:
    if isinstance(document, dict):
        return str(document.get("text", ""))
    return document if isinstance(document, str) else str(document)


def rerank(model: str, query: str, documents: list[Any], *, rid: str) -> dict[str, Any]:
    """Jina/Cohere-v1 shape (what vLLM and llama.cpp answer), best document first."""
    texts = [_doc_text(d) for d in documents]
    ranked = sorted(enumerate(texts), key=lambda it: (-_score(query, it[1]), it[0]))
    results = [
        {"index": i, "document": {"text": t}, "relevance_score": _score(query, t)}
        for i, t in ranked
    ]
    tokens = len(query.split()) + sum(len(t.split()) for t in texts)
    return {"id": rid, "model": model, "usage": {"total_tokens": tokens}, "results": results}


def score(model: str, text_1: str, texts_2: list[str], *, rid: str) -> dict[str, Any]:
    """vLLM's ``/v1/score`` shape: one score per second text."""
    return {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [
            {"index": i, "object": "score", "score": _score(text_1, t)}
            for i, t in enumerate(texts_2)
        ],
        "usage": {"prompt_tokens": len(text_1.split()), "total_tokens": len(text_1.split())},
    }


# --- audio and images -----------------------------------------------------------------------

#: A 1x1 transparent PNG: what the demo "draws".
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def transcription(filename: str, size: int) -> dict[str, Any]:
    return {"text": f"echo: {filename} ({size} bytes)"}


def images(count: int) -> dict[str, Any]:
    data = [{"b64_json": base64.b64encode(PIXEL).decode()} for _ in range(max(1, min(count, 4)))]
    return {"created": int(time.time()), "data": data}


# --- Ollama ---------------------------------------------------------------------------------


def ollama_embeddings(prompt: str) -> dict[str, Any]:
    """The older ``/api/embeddings`` answer: one vector for one prompt."""
    return {"embedding": embedding(prompt)}


def ollama_show(model: str) -> dict[str, Any]:
    return {
        "modelfile": f"FROM {model}\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "demo",
            "families": ["demo"],
            "parameter_size": "0B",
            "quantization_level": "",
        },
        "model_info": {"general.architecture": "demo", "demo.context_length": 4096},
        "capabilities": ["completion", "embedding"],
        "modified_at": "2026-01-01T00:00:00Z",
    }
