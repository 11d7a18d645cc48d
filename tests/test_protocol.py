"""The wire protocol: JSON messages as Go peers send them, and binary frames between py peers."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamapool import protocol
from llamapool.errors import ProtocolError
from llamapool.protocol import (
    FRAME_REQUEST_BODY,
    FRAME_RESPONSE_CHUNK,
    Cancel,
    Heartbeat,
    Message,
    ModelsUpdate,
    ProxyRequest,
    Register,
    Registered,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    WireError,
    decode,
    encode,
    pack_frame,
    unpack_frame,
)

BINARY = bytes(range(256))

MESSAGES: list[Message] = [
    Register(
        worker_id="w-1",
        worker_name="gpu-box",
        worker_key="secret",
        models=["llama3:8b", "meta-llama/Llama-3.1-8B-Instruct"],
        max_concurrency=4,
        version="0.1.0",
        build_sha="abc123",
        build_date="2026-01-01",
        backend="ollama",
        protocol=1,
        features=["binary_frames", "models_update"],
        paths=["/api/chat", "/v1/chat/completions"],
    ),
    Register(worker_id="w-2", token="legacy-secret"),
    Heartbeat(ts=1_767_225_600),
    ResponseHeaders("r-1", 200, {"Content-Type": "text/event-stream", "X-Request-Id": "abc"}),
    ResponseHeaders("r-1", 404),
    ResponseChunk("r-1", b'data: {"choices": []}\n\n'),
    ResponseChunk("r-1", BINARY),
    ResponseChunk("r-1", b""),
    ResponseEnd("r-1"),
    ResponseEnd("r-1", WireError(code="backend_error", message="connection refused")),
    ModelsUpdate(["llama3:8b", "qwen2:7b"]),
    ModelsUpdate([]),
    ProxyRequest(
        request_id="r-1",
        method="POST",
        path="/v1/chat/completions",
        headers={"Content-Type": "application/json", "X-Request-Id": "abc"},
        stream=True,
        body=b'{"model": "llama3:8b", "stream": true}',
    ),
    ProxyRequest(request_id="r-2", method="POST", path="/api/embed", body_len=1234),
    Cancel("r-1"),
    Registered(features=["binary_frames"], version="0.1.0"),
    Registered(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_an_encode_decode_round_trip(message: Message) -> None:
    """decode(encode(m)) == m for every message class, with every field set or defaulted."""
    assert message == decode(encode(message))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_names_its_type(message: Message) -> None:
    """Each encoded message is a JSON object whose 'type' is its class's wire name."""
    assert message.TYPE == orjson.loads(encode(message))["type"]


@given(st.binary(max_size=4096))
def test_any_bytes_round_trip_through_a_chunk(data: bytes) -> None:
    """A response chunk carries arbitrary bytes, not only UTF-8 text."""
    assert ResponseChunk("r", data) == decode(encode(ResponseChunk("r", data)))


def test_chunk_bytes_travel_as_base64() -> None:
    """Chunk data is a base64 string in the JSON, as Go encodes []byte."""
    wire = orjson.loads(encode(ResponseChunk("r-1", b"\x00\xffhello")))

    assert {
        "type": "http_proxy_response_chunk",
        "request_id": "r-1",
        "data": base64.b64encode(b"\x00\xffhello").decode(),
    } == wire


def test_request_body_travels_as_base64_without_body_len() -> None:
    """A JSON request carries its body as base64 and leaves out the py-only body_len."""
    request = ProxyRequest(
        request_id="r-1",
        method="POST",
        path="/api/chat",
        headers={"Content-Type": "application/json"},
        stream=True,
        body=b'{"model":"m"}',
    )

    assert {
        "type": "http_proxy_request",
        "request_id": "r-1",
        "method": "POST",
        "path": "/api/chat",
        "headers": {"Content-Type": "application/json"},
        "stream": True,
        "body": "eyJtb2RlbCI6Im0ifQ==",
    } == orjson.loads(encode(request))


def test_body_len_is_sent_when_the_body_follows_in_a_frame() -> None:
    """With binary frames the request names its body's length and carries no body itself."""
    request = ProxyRequest(request_id="r-1", method="POST", path="/api/chat", body_len=42)
    wire = orjson.loads(encode(request))

    assert (42, "") == (wire["body_len"], wire["body"])


def test_response_end_without_error_omits_the_error_key() -> None:
    """A successful end has no 'error' key at all, as Go's omitempty leaves it out."""
    assert {"type": "http_proxy_response_end", "request_id": "r-1"} == orjson.loads(
        encode(ResponseEnd("r-1"))
    )


def test_response_end_with_error_carries_code_and_message() -> None:
    """A failed end carries {'code', 'message'}."""
    wire = orjson.loads(encode(ResponseEnd("r-1", WireError("backend_error", "refused"))))

    assert {"code": "backend_error", "message": "refused"} == wire["error"]


def test_register_has_the_fields_a_go_server_reads() -> None:
    """A register names worker_id, worker_name, worker_key, models and max_concurrency."""
    register = Register(worker_id="w", worker_name="n", worker_key="k", models=["m"])
    expected = {
        "type": "register",
        "worker_id": "w",
        "worker_name": "n",
        "worker_key": "k",
        "models": ["m"],
        "max_concurrency": 1,
    }

    wire = orjson.loads(encode(register))

    assert expected == {key: wire.get(key) for key in expected}


# --- what Go peers send ---------------------------------------------------------------------


def test_go_register_with_legacy_token_decodes() -> None:
    """A Go worker's register with the legacy 'token' field gives that token as the key."""
    text = (
        '{"type":"register","worker_id":"w-1","worker_name":"gpu","token":"legacy",'
        '"models":["llama3:8b"],"max_concurrency":2}'
    )
    register = decode(text)

    assert isinstance(register, Register)
    assert ("legacy", ["llama3:8b"], 2) == (
        register.key,
        register.models,
        register.max_concurrency,
    )
    assert [] == register.features
    assert [] == register.paths


def test_worker_key_wins_over_the_legacy_token() -> None:
    """When both are sent, worker_key is the key."""
    register = decode('{"type":"register","worker_key":"new","token":"old"}')

    assert isinstance(register, Register)
    assert "new" == register.key


def test_go_request_decodes_its_base64_body() -> None:
    """A Go server's http_proxy_request decodes with its body and no body_len."""
    text = (
        '{"type":"http_proxy_request","request_id":"r-1","method":"POST",'
        '"path":"/v1/chat/completions","headers":{"Content-Type":"application/json"},'
        '"stream":false,"body":"eyJtb2RlbCI6Im0ifQ=="}'
    )

    assert ProxyRequest(
        request_id="r-1",
        method="POST",
        path="/v1/chat/completions",
        headers={"Content-Type": "application/json"},
        stream=False,
        body=b'{"model":"m"}',
    ) == decode(text)


def test_unknown_fields_are_ignored() -> None:
    """Fields a message does not define (extensions, newer peers) are ignored."""
    text = '{"type":"heartbeat","ts":5,"worker_id":"w","load":{"inflight":[1,2]},"extra":null}'

    assert Heartbeat(ts=5) == decode(text)


def test_null_chunk_data_is_empty_bytes() -> None:
    """Go encodes a nil []byte as null; that decodes to b''."""
    assert ResponseChunk("r-1", b"") == decode(
        '{"type":"http_proxy_response_chunk","request_id":"r-1","data":null}'
    )


def test_null_error_is_no_error() -> None:
    """An end with 'error': null is a successful end."""
    assert ResponseEnd("r-1") == decode(
        '{"type":"http_proxy_response_end","request_id":"r-1","error":null}'
    )


def test_bytes_input_decodes_like_text() -> None:
    """decode accepts the frame as bytes as well as str."""
    assert Cancel("r-1") == decode(b'{"type":"http_proxy_cancel","request_id":"r-1"}')


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"worker_status","inflight":3}',
        '{"type":"http_proxy_response_trailers","request_id":"r","trailers":"not checked"}',
        '{"type":""}',
    ],
)
def test_unknown_type_decodes_to_none(text: str) -> None:
    """A well-formed message of a type we do not know is None, whatever its fields."""
    assert None is decode(text)


@pytest.mark.parametrize(
    "text",
    [
        # not JSON
        "",
        "nul",
        "{",
        '{"type":"heartbeat","ts":1e400}',
        b"\xff\xfe",
        "[" * 2000 + "]" * 2000,
        # not an object
        "[]",
        '"register"',
        "42",
        "null",
        # no string type
        "{}",
        '{"type":null}',
        '{"type":5}',
        '{"type":["register"]}',
        # wrong field types
        '{"type":"heartbeat"}',
        '{"type":"heartbeat","ts":"5"}',
        '{"type":"heartbeat","ts":true}',
        '{"type":"heartbeat","ts":null}',
        '{"type":"register","worker_id":7}',
        '{"type":"register","worker_key":null}',
        '{"type":"register","max_concurrency":"4"}',
        '{"type":"register","models":"llama3:8b"}',
        '{"type":"register","models":{"llama3:8b":1}}',
        '{"type":"register","models":[1]}',
        '{"type":"register","features":"binary_frames"}',
        '{"type":"registered","features":"binary_frames"}',
        '{"type":"models_update","models":"llama3:8b"}',
        '{"type":"http_proxy_response_headers","request_id":"r","status":"200"}',
        '{"type":"http_proxy_response_headers","request_id":"r","status":200,"headers":[]}',
        '{"type":"http_proxy_response_headers","request_id":"r","status":200,"headers":{"a":1}}',
        '{"type":"http_proxy_response_chunk","request_id":"r","data":"not base64!"}',
        '{"type":"http_proxy_response_chunk","request_id":"r","data":"aGk"}',
        '{"type":"http_proxy_response_chunk","request_id":"r","data":[104,105]}',
        '{"type":"http_proxy_response_chunk","data":"aGk="}',
        '{"type":"http_proxy_response_end","request_id":"r","error":"boom"}',
        '{"type":"http_proxy_response_end","request_id":"r","error":{"code":1,"message":"x"}}',
        '{"type":"http_proxy_request","request_id":"r","method":"POST"}',
        '{"type":"http_proxy_request","request_id":"r","method":"POST","path":"/","stream":"1"}',
        '{"type":"http_proxy_request","request_id":"r","method":"POST","path":"/","body":5}',
        '{"type":"http_proxy_cancel","request_id":null}',
    ],
)
def test_malformed_messages_raise_protocol_error(text: str | bytes) -> None:
    """Anything that is not a well-formed message raises ProtocolError, never another error."""
    with pytest.raises(ProtocolError):
        decode(text)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
FIELD_NAMES = st.sampled_from(
    [
        "request_id",
        "worker_id",
        "worker_key",
        "token",
        "models",
        "features",
        "paths",
        "max_concurrency",
        "protocol",
        "ts",
        "status",
        "headers",
        "data",
        "error",
        "method",
        "path",
        "stream",
        "body",
        "body_len",
    ]
)
TYPES = st.sampled_from([m.TYPE for m in MESSAGES])


@settings(max_examples=300, deadline=None)
@given(kind=TYPES, fields=st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6))
def test_decode_never_raises_anything_but_protocol_error(kind: str, fields: dict[str, Any]) -> None:
    """Whatever fields a known message type arrives with, decode answers a message or
    ProtocolError."""
    text = json.dumps({**fields, "type": kind})
    try:
        message = decode(text)
    except ProtocolError:
        return
    assert message is not None
    assert kind == message.TYPE


# --- binary frames --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [FRAME_REQUEST_BODY, FRAME_RESPONSE_CHUNK])
@pytest.mark.parametrize("request_id", ["r-1", "0123456789abcdef" * 2, "réq-ü", "x" * 255])
@pytest.mark.parametrize("payload", [b"", b'{"model": "m"}', BINARY])
def test_frames_round_trip(kind: int, request_id: str, payload: bytes) -> None:
    """unpack_frame(pack_frame(k, id, p)) gives back k, id and p."""
    unpacked_kind, unpacked_id, unpacked = unpack_frame(pack_frame(kind, request_id, payload))

    assert (kind, request_id, payload) == (unpacked_kind, unpacked_id, bytes(unpacked))


def test_frame_layout_is_kind_id_length_id_payload() -> None:
    """A frame is one kind byte, one id-length byte, the UTF-8 id, then the raw payload."""
    assert b"\x02\x03r-1\x00\xffraw" == pack_frame(FRAME_RESPONSE_CHUNK, "r-1", b"\x00\xffraw")


def test_pack_accepts_a_memoryview() -> None:
    """A payload given as a memoryview is packed like the same bytes."""
    assert pack_frame(1, "r", b"body") == pack_frame(1, "r", memoryview(b"xbodyx")[1:5])


def test_unpacked_payload_is_a_view_not_a_copy() -> None:
    """The payload is a memoryview into the received frame: no bytes are copied."""
    frame = pack_frame(FRAME_RESPONSE_CHUNK, "r-1", BINARY * 64)

    _, _, payload = unpack_frame(frame)

    assert isinstance(payload, memoryview)
    assert frame is payload.obj
    assert BINARY * 64 == payload


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x02",
        b"\x02\x05r-1",  # the id is said to be 5 bytes but only 3 follow
        b"\x02\xff",
        b"\x02\x02\xff\xfe payload",  # the id is not UTF-8
    ],
)
def test_truncated_or_garbled_frames_raise_protocol_error(frame: bytes) -> None:
    """A frame too short for its header or id, or with a non-UTF-8 id, raises ProtocolError."""
    with pytest.raises(ProtocolError):
        unpack_frame(frame)


def test_a_request_id_over_255_bytes_can_not_be_framed() -> None:
    """The id length is one byte, so a longer id raises ProtocolError instead of wrapping."""
    with pytest.raises(ProtocolError):
        pack_frame(FRAME_REQUEST_BODY, "é" * 128, b"body")


def test_go_nulls_decode_as_empty() -> None:
    """Go encodes a nil slice or map as null: a register and headers with nulls are accepted."""
    register = protocol.decode('{"type":"register","worker_id":"w","models":null}')
    headers = protocol.decode(
        '{"type":"http_proxy_response_headers","request_id":"r","status":200,"headers":null}'
    )
    assert isinstance(register, protocol.Register)
    assert [] == register.models
    assert isinstance(headers, protocol.ResponseHeaders)
    assert {} == headers.headers
