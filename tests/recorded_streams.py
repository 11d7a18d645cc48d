"""Answers as each API's runtimes stream them (vLLM's field order, OpenAI's and Anthropic's
event shapes), recorded once, for the stream fidelity tests to replay through the pool."""

from __future__ import annotations

from typing import Any

import orjson

MODEL = "Qwen/Qwen3-30B-A3B"


def sse(*events: dict[str, Any], done: bool = False, named: bool = False) -> bytes:
    out = b"".join(
        (b"event: " + str(e["type"]).encode() + b"\n" if named else b"")
        + b"data: "
        + orjson.dumps(e)
        + b"\n\n"
        for e in events
    )
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """A vLLM chat.completion.chunk, fields in vLLM's order."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-7f3a",
        "object": "chat.completion.chunk",
        "created": 1733000000,
        "model": MODEL,
        "choices": [choice],
    }


#: stream_options.include_usage: reasoning, then a tool call whose arguments arrive in pieces
#: (never merged), then the usage-only chunk with ``choices: []``, then ``[DONE]``.
CHAT_STREAM = sse(
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "The user wants the weather;"}),
    chunk({"reasoning_content": " call the tool."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "chatcmpl-tool-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris", '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"unit": "C"}'}}]}),
    chunk({}, finish="tool_calls"),
    {
        "id": "chatcmpl-7f3a",
        "object": "chat.completion.chunk",
        "created": 1733000000,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 182, "total_tokens": 229, "completion_tokens": 47},
    },
    done=True,
)

#: A non-streamed structured output (response_format json_schema) with reasoning.
STRUCTURED = orjson.dumps(
    {
        "id": "chatcmpl-9b1c",
        "object": "chat.completion",
        "created": 1733000001,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "reasoning_content": "Fill the schema.",
                    "content": '{"name": "Ada", "age": 36}',
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 64, "total_tokens": 80, "completion_tokens": 16},
    }
)


def response_object(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    """A Responses API ``response``, fields in openai-python's order (as vLLM dumps it)."""
    output = (
        []
        if usage is None
        else [
            {
                "id": "msg_5e",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Hi!", "annotations": []}],
            }
        ]
    )
    return {
        "id": "resp_8d2e4c",
        "created_at": 1733000002,
        "model": MODEL,
        "object": "response",
        "output": output,
        "status": status,
        "usage": usage,
    }


RESPONSES_USAGE = {
    "input_tokens": 21,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 3,
    "output_tokens_details": {"reasoning_tokens": 1},
    "total_tokens": 24,
}
#: The Responses API's typed events, ``event:`` lines included.
RESPONSES_STREAM = sse(
    {
        "response": response_object("in_progress", None),
        "sequence_number": 0,
        "type": "response.created",
    },
    {
        "response": response_object("in_progress", None),
        "sequence_number": 1,
        "type": "response.in_progress",
    },
    {
        "item": {"id": "rs_1", "type": "reasoning", "summary": []},
        "output_index": 0,
        "sequence_number": 2,
        "type": "response.output_item.added",
    },
    {
        "delta": "Greet.",
        "item_id": "rs_1",
        "output_index": 0,
        "content_index": 0,
        "sequence_number": 3,
        "type": "response.reasoning_text.delta",
    },
    {
        "delta": "Hi",
        "item_id": "msg_5e",
        "output_index": 1,
        "content_index": 0,
        "sequence_number": 4,
        "type": "response.output_text.delta",
        "logprobs": [],
    },
    {
        "delta": "!",
        "item_id": "msg_5e",
        "output_index": 1,
        "content_index": 0,
        "sequence_number": 5,
        "type": "response.output_text.delta",
        "logprobs": [],
    },
    {
        "response": response_object("completed", RESPONSES_USAGE),
        "sequence_number": 6,
        "type": "response.completed",
    },
    named=True,
)
RESPONSES_BODY = orjson.dumps(response_object("completed", RESPONSES_USAGE))

#: Anthropic's events, message_start to message_stop: thinking, text, a tool_use whose input
#: arrives as partial JSON, a ping, and usage split over message_start and message_delta.
MESSAGES_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_01XY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 472,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 9,
                "output_tokens": 2,
            },
        },
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": ""},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "Need the weather."},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
    },
    {"type": "content_block_stop", "index": 0},
    {"type": "ping"},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": "Checking."},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": 'is"}'},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
    named=True,
)
MESSAGES_BODY = orjson.dumps(
    {
        "id": "msg_02",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6},
    }
)

CHAT_REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Weather in Paris?"}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
}
STRUCTURED_REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Who?"}],
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "person",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            },
        },
    },
}

#: name: (path, request, recorded answer, the usage it reports)
