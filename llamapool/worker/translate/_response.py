"""OpenAI answers as Ollama answers: whole bodies, SSE streams as NDJSON, and errors.

A :class:`Reply` follows one request. Streamed, it turns each chunk of the backend's event
stream into the NDJSON lines it completes (text and thinking as they come; tool calls once their
argument deltas are complete), and ends with Ollama's ``done`` line, carrying the finish reason,
the token counts from the backend's usage and the durations the worker measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from llamapool.worker.translate._request import Kind, Plan
from llamapool.worker.translate._sse import SSEParser

#: Content types of what a :class:`Reply` produces.
NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"

#: OpenAI finish reasons as Ollama names them (a tool call ends with "stop" on Ollama).
_DONE_REASONS = {"tool_calls": "stop", "function_call": "stop"}


class BadAnswer(ValueError):
    """The backend answered something that is not the OpenAI shape."""


def error_body(message: str) -> bytes:
    """An error in Ollama's shape."""
    return orjson.dumps({"error": message})


def error_message(status: int, body: bytes) -> str:
    """The message of an OpenAI-compatible server's error body (whatever its dialect)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:1000] or f"the backend answered HTTP {status}"
    if isinstance(data, dict):
        for value in (data.get("error"), data.get("message"), data.get("detail")):
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])
            if isinstance(value, str) and value:
                return value
            if isinstance(value, list) and value:  # FastAPI's validation details
                return "; ".join(str(v.get("msg", v) if isinstance(v, dict) else v) for v in value)
    return f"the backend answered HTTP {status}"


def _timestamp(seconds: float) -> str:
    whole = int(seconds)
    micros = int((seconds - whole) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


class Reply:
    """The Ollama answer to one translated request, built from the backend's OpenAI answer.

    ``clock`` (nanoseconds) times the durations from the reply's creation; ``wall`` (seconds)
    stamps ``created_at``. Tests pass fixed ones.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self._clock = clock
        self._wall = wall
        self._started = clock()
        self._first = 0
        self._sse = SSEParser()
        self._chat_shape = plan.kind is Kind.CHAT
        self._done_reason = ""
        self._usage: dict[str, Any] = {}
        self._calls: dict[int, dict[str, str]] = {}
        self._finished = False

    @property
    def content_type(self) -> str:
        return NDJSON if self.plan.stream else JSON

    # --- whole answers ------------------------------------------------------------------------

    def local(self) -> bytes:
        """The answer the worker gives itself (:attr:`Plan.local`)."""
        local = self.plan.local or {}
        if self.plan.kind in (Kind.EMBED, Kind.EMBEDDINGS):
            return orjson.dumps(local)
        line = {"model": self.plan.model, "created_at": self._now(), **local, "done": True}
        return orjson.dumps(line) + (b"\n" if self.plan.stream else b"")

    def whole(self, body: bytes) -> bytes:
        """The Ollama answer to a non-streamed OpenAI answer (one NDJSON line if the client
        asked for a stream). Raises :class:`BadAnswer`."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadAnswer("the backend's answer is not JSON") from None
        if not isinstance(data, dict):
            raise BadAnswer("the backend's answer is not a JSON object")
        if self.plan.kind is Kind.EMBED:
            return orjson.dumps(self._embed(data))
        if self.plan.kind is Kind.EMBEDDINGS:
            vectors = self._vectors(data)
            return orjson.dumps({"embedding": vectors[0] if vectors else []})
        self._first = self._first or self._clock()
        choice = _first_choice(data)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else None
        if message is not None:
            text = message.get("content") or ""
            thinking = message.get("reasoning_content") or message.get("reasoning") or ""
            calls = message.get("tool_calls") or []
        else:
            text, thinking, calls = choice.get("text") or "", "", []
        if not isinstance(calls, list):
            raise BadAnswer("the backend's tool_calls are not a list")
        tool_calls = [_tool_call(c, i) for i, c in enumerate(calls) if isinstance(c, dict)]
        self._done_reason = str(choice.get("finish_reason") or "")
        if isinstance(data.get("usage"), dict):
            self._usage = data["usage"]
        line = self._line(str(text), str(thinking), tool_calls)
        line.update(self._final())
        return orjson.dumps(line) + (b"\n" if self.plan.stream else b"")

    def _embed(self, data: dict[str, Any]) -> dict[str, Any]:
        usage = data.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        answer: dict[str, Any] = {"model": self.plan.model, "embeddings": self._vectors(data)}
        answer.update(total_duration=self._clock() - self._started, load_duration=0)
        if isinstance(tokens, int):
            answer["prompt_eval_count"] = tokens
        return answer

    @staticmethod
    def _vectors(data: dict[str, Any]) -> list[Any]:
        items = data.get("data")
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("embedding"), list) for i in items
        ):
            raise BadAnswer("the backend's answer is not an OpenAI embedding list")
        ordered = sorted(items, key=lambda i: i.get("index", 0))
        return [i["embedding"] for i in ordered]

    # --- streams ------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """The NDJSON lines that this chunk of the backend's event stream completes."""
        if self._finished:
            return b""
        out: list[bytes] = []
        for payload in self._sse.feed(chunk):
            if not self._event(payload, out):
                break
        return b"".join(out)

    def finish(self) -> bytes:
        """The last lines once the backend's stream ended: pending tool calls and ``done``."""
        if self._finished:
            return b""
        out: list[bytes] = []
        if not all(self._event(payload, out) for payload in self._sse.close()):
            return b"".join(out)
        self._finished = True
        if not self._flush_calls(out):
            return b"".join(out)
        line = self._line("", "", [])
        line.update(self._final())
        out.append(orjson.dumps(line) + b"\n")
        return b"".join(out)

    def _event(self, payload: bytes, out: list[bytes]) -> bool:
        """Add the lines one event makes to ``out``; ``False`` once the stream failed."""
        if payload == b"[DONE]":
            return True
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._fail("the backend streamed an event that is not JSON", out)
        if not isinstance(data, dict):
            return self._fail("the backend streamed an event that is not a JSON object", out)
        if "error" in data or data.get("object") == "error":
            return self._fail(error_message(500, payload), out)
        if isinstance(data.get("usage"), dict):
            self._usage = data["usage"]
        choice = _first_choice(data)
        if not choice:
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                self._add_calls(calls)
        else:
            text, thinking = choice.get("text") or "", ""
        if thinking and self.plan.hide_thinking:
            thinking = ""
        if text or thinking:
            self._first = self._first or self._clock()
            out.append(orjson.dumps(self._line(str(text), str(thinking), [])) + b"\n")
        reason = choice.get("finish_reason")
        if reason:
            self._done_reason = str(reason)
            return self._flush_calls(out)
        return True

    def _add_calls(self, deltas: list[Any]) -> None:
        """Accumulate streamed tool-call pieces by index: id and name once, arguments
        concatenated."""
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            index = delta.get("index", 0)
            call = self._calls.setdefault(index if isinstance(index, int) else 0, {})
            if isinstance(delta.get("id"), str):
                call["id"] = delta["id"]
            function = delta.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    call["name"] = call.get("name", "") + function["name"]
                if isinstance(function.get("arguments"), str):
                    call["arguments"] = call.get("arguments", "") + function["arguments"]

    def _flush_calls(self, out: list[bytes]) -> bool:
        """Add the tool calls accumulated so far as one line; ``False`` if they are broken."""
        if not self._calls or not self._chat_shape:  # generate has no tool calls
            self._calls = {}
            return True
        calls = [
            {"id": c.get("id", ""), "function": {"name": c.get("name", ""),
                                                 "arguments": c.get("arguments", "")}}
            for _, c in sorted(self._calls.items())
        ]  # fmt: skip
        self._calls = {}
        try:
            tool_calls = [_tool_call(c, i) for i, c in enumerate(calls)]
        except BadAnswer as exc:
            return self._fail(str(exc), out)
        self._first = self._first or self._clock()
        out.append(orjson.dumps(self._line("", "", tool_calls)) + b"\n")
        return True

    def _fail(self, message: str, out: list[bytes]) -> bool:
        """End the stream with an error line, as Ollama does when generation fails."""
        self._finished = True
        out.append(orjson.dumps({"error": message}) + b"\n")
        return False

    # --- the lines ----------------------------------------------------------------------------

    def _now(self) -> str:
        return _timestamp(self._wall())

    def _line(self, text: str, thinking: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        if self.plan.hide_thinking:
            thinking = ""
        line: dict[str, Any] = {"model": self.plan.model, "created_at": self._now()}
        if self._chat_shape:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            line["message"] = message
        else:
            line["response"] = text
            if thinking:
                line["thinking"] = thinking
        line["done"] = False
        return line

    def _final(self) -> dict[str, Any]:
        """The fields of the ``done`` line: reason, durations, token counts."""
        now = self._clock()
        first = self._first or now
        reason = self._done_reason or "stop"
        final: dict[str, Any] = {
            "done": True,
            "done_reason": _DONE_REASONS.get(reason, reason),
            "total_duration": now - self._started,
            "load_duration": 0,
        }
        prompt = self._usage.get("prompt_tokens")
        completion = self._usage.get("completion_tokens")
        if isinstance(prompt, int):
            final["prompt_eval_count"] = prompt
            final["prompt_eval_duration"] = first - self._started
        if isinstance(completion, int):
            final["eval_count"] = completion
            final["eval_duration"] = now - first
        return final


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list):
        return {}
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return {}


def _tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """An OpenAI tool call as Ollama's: arguments as an object, not JSON text."""
    function = call.get("function")
    if not isinstance(function, dict):
        raise BadAnswer("the backend's tool call has no function")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise BadAnswer(
                f"the backend's arguments for tool {function.get('name')!r} are not JSON"
            ) from None
    if not isinstance(arguments, dict):
        raise BadAnswer(f"the backend's arguments for tool {function.get('name')!r} are not "
                        "a JSON object")  # fmt: skip
    result: dict[str, Any] = {
        "function": {"index": index, "name": str(function.get("name") or ""),
                     "arguments": arguments}
    }  # fmt: skip
    if call.get("id"):
        result = {"id": str(call["id"]), **result}
    return result
