"""The pure translation between Ollama's native API and OpenAI's: requests, whole answers,
streams cut anywhere, and errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from llamapool.worker.translate import (
    BadAnswer,
    Kind,
    Plan,
    Reply,
    SSEParser,
    TranslationError,
    error_message,
    plan,
    translatable,
)

VLLM = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
USER = [{"role": "user", "content": "hi"}]


def openai(path: str, body: dict[str, Any], served: frozenset[str] = VLLM) -> tuple[str, Any]:
    p = plan(path, orjson.dumps(body), served=served)
    return p.upstream, orjson.loads(p.body)


def ticking() -> Callable[[], int]:
    """A clock that advances one microsecond each time it is read."""
    ticks = iter(range(0, 10**12, 1000))
    return lambda: next(ticks)


def reply(p: Plan) -> Reply:
    return Reply(p, clock=ticking(), wall=lambda: 1_700_000_000.25)


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in raw.splitlines()]


# --- which paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("served", "expected"),
    [
        (VLLM, {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"}),
        ({"/v1/embeddings"}, {"/api/embed", "/api/embeddings"}),
        ({"/v1/completions"}, {"/api/generate"}),
        ({"/v1/messages", "/api/chat"}, set()),
    ],
)
def test_translatable_paths_follow_the_openai_paths_served(
    served: set[str], expected: set[str]
) -> None:
    """An Ollama path is translatable when the backend serves an OpenAI path that stands in."""
    assert expected == translatable(served)


# --- requests -------------------------------------------------------------------------------

CHAT_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "streamed by default, usage asked for",
        {"messages": USER},
        {"stream": True, "stream_options": {"include_usage": True}},
    ),
    ("not streamed", {"messages": USER, "stream": False}, {"stream": False}),
    (
        "sampling options",
        {
            "messages": USER,
            "stream": False,
            "options": {
                "temperature": 0.2,
                "top_p": 0.9,
                "top_k": 7,
                "min_p": 0.05,
                "seed": 42,
                "stop": ["END"],
                "num_predict": 12,
                "repeat_penalty": 1.1,
                "frequency_penalty": 0.5,
                "presence_penalty": 0.25,
            },
        },
        {
            "stream": False,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.05,
            "seed": 42,
            "stop": ["END"],
            "max_tokens": 12,
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.25,
        },
    ),
    (
        "resource options and keep_alive ignored, unlimited num_predict left out",
        {
            "messages": USER,
            "stream": False,
            "keep_alive": "5m",
            "options": {
                "num_ctx": 8192,
                "num_gpu": 1,
                "num_thread": 8,
                "num_predict": -1,
                "mirostat": 0,
                "typical_p": 1.0,
                "unknown_option": 3,
            },
        },
        {"stream": False},
    ),
    (
        "format json",
        {"messages": USER, "stream": False, "format": "json"},
        {"stream": False, "response_format": {"type": "json_object"}},
    ),
    (
        "format schema",
        {"messages": USER, "stream": False, "format": {"type": "object"}},
        {
            "stream": False,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": {"type": "object"}},
            },
        },
    ),
    (
        "think false",
        {"messages": USER, "stream": False, "think": False},
        {"stream": False, "chat_template_kwargs": {"enable_thinking": False}},
    ),
    (
        "think level",
        {"messages": USER, "stream": False, "think": "high"},
        {"stream": False, "reasoning_effort": "high"},
    ),
]


@pytest.mark.parametrize(("body", "expected"), [pytest.param(b, e, id=i) for i, b, e in CHAT_CASES])
def test_chat_options_map_to_openai(body: dict[str, Any], expected: dict[str, Any]) -> None:
    """/api/chat becomes /v1/chat/completions with each option mapped, ignored or left out."""
    upstream, sent = openai("/api/chat", {"model": "m", **body})

    assert "/v1/chat/completions" == upstream
    assert {"model": "m", "messages": USER, **expected} == sent


def test_chat_messages_carry_images_tools_and_tool_results() -> None:
    """Images become data URLs, tool call arguments JSON text, and tool results name the call
    they answer."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "look", "images": ["iVBORw0KGgoAAAA", "/9j/4AAQ"]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Oslo"}}},
                {"id": "call_b", "function": {"name": "time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "time"},
        {"role": "tool", "content": "rain"},
    ]

    _, sent = openai("/api/chat", {"model": "m", "messages": messages, "tools": tools})

    assert tools == sent["tools"]
    assert [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAA"},
                },
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            ],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "time", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "call_b"},
        {"role": "tool", "content": "rain", "tool_call_id": "call_1_0"},
    ] == sent["messages"]


@pytest.mark.parametrize(
    ("body", "upstream", "expected"),
    [
        pytest.param(
            {"prompt": "hi", "system": "be brief", "stream": False, "images": ["R0lGODlh"]},
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/gif;base64,R0lGODlh"},
                            },
                        ],
                    },
                ],
                "stream": False,
            },
            id="templated prompt is a one-turn chat",
        ),
        pytest.param(
            {"prompt": "<s>hi", "raw": True, "system": "ignored", "options": {"num_predict": 3}},
            "/v1/completions",
            {
                "prompt": "<s>hi",
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 3,
            },
            id="raw prompt is a text completion",
        ),
        pytest.param(
            {"prompt": "def f(", "suffix": "return 1", "stream": False},
            "/v1/completions",
            {"prompt": "def f(", "suffix": "return 1", "stream": False},
            id="suffix is a text completion",
        ),
    ],
)
def test_generate_maps_to_chat_or_text_completion(
    body: dict[str, Any], upstream: str, expected: dict[str, Any]
) -> None:
    """/api/generate applies the model's template (a chat) unless raw or given a suffix."""
    assert (upstream, {"model": "m", **expected}) == openai("/api/generate", {"model": "m", **body})


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/api/embed",
            {"input": ["a", "b"], "truncate": True, "dimensions": 4},
            {"input": ["a", "b"], "dimensions": 4},
        ),
        ("/api/embed", {"input": "a", "keep_alive": 0}, {"input": "a"}),
        ("/api/embeddings", {"prompt": "a", "options": {"num_ctx": 8}}, {"input": "a"}),
    ],
)
def test_embeddings_map_to_openai(
    path: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    """/api/embed and /api/embeddings become /v1/embeddings with float vectors."""
    assert (
        "/v1/embeddings",
        {"model": "m", **expected, "encoding_format": "float"},
    ) == openai(path, {"model": "m", **body})


def test_an_alias_model_replaces_the_bodys() -> None:
    """The model the server chose through an alias is the one sent and answered."""
    p = plan(
        "/api/chat", orjson.dumps({"model": "alias", "messages": USER}), served=VLLM, model="real"
    )

    assert ("real", "real") == (p.model, orjson.loads(p.body)["model"])


@pytest.mark.parametrize(
    ("path", "body", "served", "words"),
    [
        ("/api/generate", {"prompt": "hi", "context": [1, 2]}, VLLM, "context"),
        ("/api/generate", {"prompt": "hi", "template": "{{ .Prompt }}"}, VLLM, "template"),
        ("/api/chat", {"messages": USER, "logprobs": True}, VLLM, "logprobs"),
        ("/api/chat", {"messages": USER, "options": {"mirostat": 2}}, VLLM, "mirostat"),
        ("/api/chat", {"messages": USER, "options": {"tfs_z": 0.5}}, VLLM, "tfs_z"),
        ("/api/chat", {"messages": USER, "format": "yaml"}, VLLM, "format"),
        ("/api/chat", {"messages": "hi"}, VLLM, "messages"),
        ("/api/generate", {"prompt": "hi", "raw": True, "images": ["x"]}, VLLM, "images"),
        ("/api/generate", {"prompt": "hi"}, frozenset({"/v1/completions"}), "chat"),
        (
            "/api/generate",
            {"prompt": "hi", "raw": True},
            frozenset({"/v1/chat/completions"}),
            "text completion",
        ),
        ("/api/embed", {"input": [1, 2]}, VLLM, "input"),
        ("/api/chat", {"messages": USER, "model": ""}, VLLM, "model"),
    ],
)
def test_what_cannot_be_mapped_is_refused(
    path: str, body: dict[str, Any], served: frozenset[str], words: str
) -> None:
    """A field that would change the answer if dropped is a TranslationError naming it."""
    with pytest.raises(TranslationError) as caught:
        plan(path, orjson.dumps({"model": "m", **body}), served=served)

    assert words in str(caught.value)


def test_a_body_that_is_not_json_is_refused() -> None:
    """A body that is not a JSON object cannot be translated."""
    with pytest.raises(TranslationError):
        plan("/api/chat", b"[1]", served=VLLM)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/api/chat",
            {"messages": [], "stream": False},
            {
                "model": "m",
                "created_at": "2023-11-14T22:13:20.250000Z",
                "message": {"role": "assistant", "content": ""},
                "done_reason": "load",
                "done": True,
            },
        ),
        (
            "/api/generate",
            {"stream": False},
            {
                "model": "m",
                "created_at": "2023-11-14T22:13:20.250000Z",
                "response": "",
                "done_reason": "load",
                "done": True,
            },
        ),
        ("/api/embed", {"input": []}, {"model": "m", "embeddings": []}),
        ("/api/embeddings", {"prompt": ""}, {"embedding": []}),
    ],
)
def test_nothing_to_generate_is_answered_by_the_worker(
    path: str, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    """A request with nothing to do is answered as Ollama answers a load, without the backend."""
    p = plan(path, orjson.dumps({"model": "m", **body}), served=VLLM)

    assert ("", expected) == (p.upstream, orjson.loads(reply(p).local()))


# --- whole answers --------------------------------------------------------------------------


def test_a_chat_answer_becomes_ollamas() -> None:
    """Content, reasoning, tool calls (arguments parsed) and usage land in Ollama's fields."""
    p = plan(
        "/api/chat", orjson.dumps({"model": "m", "messages": USER, "stream": False}), served=VLLM
    )
    answer = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "ok",
                    "reasoning_content": "hmm",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }

    got = orjson.loads(reply(p).whole(orjson.dumps(answer)))

    assert {
        "model": "m",
        "created_at": "2023-11-14T22:13:20.250000Z",
        "message": {
            "role": "assistant",
            "content": "ok",
            "thinking": "hmm",
            "tool_calls": [
                {"id": "c1", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}}
            ],
        },
        "done": True,
        "done_reason": "stop",
        "total_duration": 2000,
        "load_duration": 0,
        "prompt_eval_count": 5,
        "prompt_eval_duration": 1000,
        "eval_count": 2,
        "eval_duration": 1000,
    } == got


def test_a_text_completion_becomes_a_generate_answer() -> None:
    """A raw generate's text and finish reason land in response and done_reason."""
    p = plan(
        "/api/generate",
        orjson.dumps({"model": "m", "prompt": "x", "raw": True, "stream": False}),
        served=VLLM,
    )
    answer = {"choices": [{"index": 0, "text": "yz", "finish_reason": "length"}]}

    got = orjson.loads(reply(p).whole(orjson.dumps(answer)))

    assert ("yz", "length", True) == (got["response"], got["done_reason"], got["done"])
    assert "eval_count" not in got  # no usage, no made-up counts


def test_embeddings_come_back_in_input_order() -> None:
    """OpenAI's embedding list, in index order, becomes Ollama's embeddings and token count."""
    p = plan("/api/embed", orjson.dumps({"model": "m", "input": ["a", "b"]}), served=VLLM)
    answer = {
        "data": [{"index": 1, "embedding": [0.2]}, {"index": 0, "embedding": [0.1]}],
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }

    got = orjson.loads(reply(p).whole(orjson.dumps(answer)))

    assert ([[0.1], [0.2]], 2) == (got["embeddings"], got["prompt_eval_count"])


def test_a_malformed_answer_is_a_bad_answer() -> None:
    """An answer that is not OpenAI's shape raises BadAnswer rather than inventing one."""
    p = plan("/api/embeddings", orjson.dumps({"model": "m", "prompt": "a"}), served=VLLM)

    with pytest.raises(BadAnswer):
        reply(p).whole(b'{"data": "nope"}')


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"message": "bad temperature", "type": "BadRequestError"}}',
            "bad temperature",
        ),
        (b'{"object": "error", "message": "model not loaded", "code": 404}', "model not loaded"),
        (b'{"error": "Unauthorized"}', "Unauthorized"),
        (b'{"detail": [{"msg": "field required"}]}', "field required"),
        (b"upstream timed out", "upstream timed out"),
        (b"", "the backend answered HTTP 502"),
    ],
)
def test_backend_error_messages_are_found_in_every_dialect(body: bytes, expected: str) -> None:
    """The message of an OpenAI, vLLM, FastAPI or plain-text error is what the client reads."""
    assert expected == error_message(502, body)


# --- streams --------------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def delta(**fields: Any) -> dict[str, Any]:
    return {"id": "x", "choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


STREAM = sse(
    delta(role="assistant", content=""),
    delta(reasoning_content="let me see"),
    delta(content="Hel"),
    delta(content="lo ✓"),
    delta(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"ci'}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]),
    {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "x", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}},
)


def chat_stream_plan(**body: Any) -> Plan:
    return plan("/api/chat", orjson.dumps({"model": "m", "messages": USER, **body}), served=VLLM)


def feed_all(r: Reply, chunks: list[bytes]) -> list[dict[str, Any]]:
    return lines(b"".join(r.feed(c) for c in chunks) + r.finish())


def test_a_chat_stream_becomes_ndjson() -> None:
    """Text and thinking stream as they come, the tool call once complete, then done with
    usage."""
    got = feed_all(reply(chat_stream_plan()), [STREAM])

    assert [
        {"role": "assistant", "content": "", "thinking": "let me see"},
        {"role": "assistant", "content": "Hel"},
        {"role": "assistant", "content": "lo ✓"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "function": {"index": 0, "name": "f", "arguments": {"city": "Oslo"}}}
            ],
        },
        {"role": "assistant", "content": ""},
    ] == [line["message"] for line in got]
    assert [False] * 4 + [True] == [line["done"] for line in got]
    final = got[-1]
    assert ("stop", 4, 6) == (final["done_reason"], final["prompt_eval_count"], final["eval_count"])


def test_a_stream_cut_anywhere_translates_the_same() -> None:
    """Every two-piece cut, and one byte at a time, give the lines of the uncut stream."""

    def messages(chunks: list[bytes]) -> list[Any]:
        return [
            (line["message"], line["done"]) for line in feed_all(reply(chat_stream_plan()), chunks)
        ]

    whole = messages([STREAM])
    crlf = STREAM.replace(b"\n", b"\r\n")
    for data in (STREAM, crlf):
        for cut in range(len(data) + 1):
            assert whole == messages([data[:cut], data[cut:]]), cut
        assert whole == messages([data[i : i + 1] for i in range(len(data))])


def test_a_generate_stream_uses_response_and_hides_thinking_when_asked() -> None:
    """A generate stream puts text in response; think false leaves reasoning out."""
    p = plan(
        "/api/generate", orjson.dumps({"model": "m", "prompt": "hi", "think": False}), served=VLLM
    )

    got = feed_all(reply(p), [STREAM])

    assert ["Hel", "lo ✓", ""] == [line["response"] for line in got]
    assert not [line for line in got if "thinking" in line]


def test_an_error_event_ends_the_stream_with_an_ollama_error() -> None:
    """An error mid-stream becomes Ollama's error line, and nothing follows it."""
    data = sse(delta(content="a"), {"error": {"message": "out of memory"}}, delta(content="b"))

    got = feed_all(reply(chat_stream_plan()), [data])

    assert [{"role": "assistant", "content": "a"}] == [got[0]["message"]]
    assert [{"error": "out of memory"}] == got[1:]


def test_broken_tool_call_arguments_are_an_error_line() -> None:
    """Tool call arguments that are not a JSON object end the stream with an error."""
    data = sse(
        delta(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}])
    )

    got = feed_all(reply(chat_stream_plan()), [data])

    assert 1 == len(got)
    assert "not JSON" in got[0]["error"]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\n\n"], [b"a"]),
        ([b": keep-alive\n\nevent: x\nid: 1\ndata: a\ndata: b\n\n"], [b"a\nb"]),
        ([b"data:a\r", b"\ndata: b\r\r"], [b"a\nb"]),
        ([b"data: unterminated"], [b"unterminated"]),
    ],
)
def test_the_sse_parser_reads_events_across_chunks(
    chunks: list[bytes], expected: list[bytes]
) -> None:
    """Comments and other fields are skipped, data lines joined, CR/CRLF/LF all end a line."""
    parser = SSEParser()
    events = [e for c in chunks for e in parser.feed(c)] + parser.close()

    assert expected == events


def test_kinds_cover_the_four_ollama_endpoints() -> None:
    """Each translatable Ollama path has its own answer shape."""
    assert 4 == len(Kind)
