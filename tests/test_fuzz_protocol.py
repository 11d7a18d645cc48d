"""Fuzzing the worker wire protocol: the decoder, binary frames, and a live worker socket fed
garbage.

Whatever a worker sends, the decoder answers a message, ``None`` (an unknown type) or
:class:`ProtocolError`, and the server ignores and counts what it cannot use, disconnecting a
worker that keeps sending what could never be valid (not messages of unknown types, and not
late answers to requests it already ended).
"""

from __future__ import annotations

import contextlib
import itertools
import re
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
from aiohttp import WSMsgType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamapool.config import ServeConfig
from llamapool.errors import ProtocolError
from llamapool.protocol import (
    Cancel,
    Credit,
    Heartbeat,
    Message,
    ModelsUpdate,
    ProxyRequest,
    Register,
    Registered,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    StatusUpdate,
    WireError,
    decode,
    encode,
    pack_frame,
    unpack_frame,
)
from llamapool.server.link import MAX_INVALID
from llamapool.server.validate import Invalid, check_models

from .conftest import WORKER_KEY, PoolServer, StartWorker, wait_for

# --- strategies -----------------------------------------------------------------------------

INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(max_size=40)
STRINGS = st.lists(TEXT, max_size=4)
HEADERS = st.dictionaries(TEXT, TEXT, max_size=4)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | INTS | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
#: Every message class with arbitrary field values.
MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Register,
        worker_id=TEXT,
        worker_name=TEXT,
        worker_key=TEXT,
        token=TEXT,
        models=STRINGS,
        max_concurrency=INTS,
        version=TEXT,
        build_sha=TEXT,
        build_date=TEXT,
        backend=TEXT,
        protocol=INTS,
        features=STRINGS,
        paths=STRINGS,
    ),
    st.builds(Heartbeat, INTS),
    st.builds(ResponseHeaders, TEXT, INTS, HEADERS),
    st.builds(ResponseChunk, TEXT, st.binary(max_size=256)),
    st.builds(ResponseEnd, TEXT, st.none() | st.builds(WireError, TEXT, TEXT)),
    st.builds(ModelsUpdate, STRINGS),
    st.builds(StatusUpdate, TEXT),
    st.builds(
        ProxyRequest,
        request_id=TEXT,
        method=TEXT,
        path=TEXT,
        headers=HEADERS,
        stream=st.booleans(),
        body=st.binary(max_size=256),
        body_len=INTS,
        window=INTS,
        model=TEXT,
    ),
    st.builds(Cancel, TEXT),
    st.builds(Credit, TEXT, INTS),
    st.builds(Registered, features=STRINGS, version=TEXT),
)


def wire_of(message: Message) -> dict[str, Any]:
    """The JSON object ``message`` travels as."""
    data: dict[str, Any] = orjson.loads(encode(message))
    return data


def default_of(field: attrs.Attribute[Any]) -> Any:
    """The value a field takes when it is left out."""
    factory = getattr(field.default, "factory", None)
    return factory() if factory is not None else field.default


def decodes_sanely(frame: str | bytes) -> Message | None:
    """decode's answer; fails the test if it raises anything but ProtocolError."""
    try:
        return decode(frame)
    except ProtocolError:
        return None


# --- the decoder ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(MESSAGES)
def test_any_message_round_trips(message: Message) -> None:
    """decode(encode(m)) == m for every message class, whatever its field values."""
    assert message == decode(encode(message))


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_any_json_value_decodes_or_raises_protocol_error(value: Any) -> None:
    """Any JSON value decodes to a message or None, or raises ProtocolError, never another
    error."""
    decodes_sanely(orjson.dumps(value))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=512))
def test_any_bytes_or_text_decode_or_raise_protocol_error(frame: bytes | str) -> None:
    """Arbitrary bytes or text never make decode raise anything but ProtocolError."""
    decodes_sanely(frame)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1))
def test_lone_surrogates_raise_protocol_error(text: str) -> None:
    """Text that is not encodable as UTF-8 is not JSON: ProtocolError."""
    try:
        decode(f'{{"type":"heartbeat","ts":1,"x":"{text}"}}')
    except ProtocolError:
        return
    raise AssertionError("decode accepted a string holding lone surrogates")


@settings(max_examples=200, deadline=None)
@given(MESSAGES, st.dictionaries(TEXT, JSON_VALUES, min_size=1, max_size=4))
def test_unknown_fields_change_nothing(message: Message, extra: dict[str, Any]) -> None:
    """Fields a message does not define are ignored: the message decodes as without them."""
    wire = wire_of(message)
    known = {f.name for f in attrs.fields(type(message))} | {"type"}
    unknown = {k: v for k, v in extra.items() if k not in known}

    assert message == decode(orjson.dumps({**unknown, **wire}))


@settings(max_examples=200, deadline=None)
@given(MESSAGES, st.data())
def test_a_dropped_field_takes_its_default_or_raises(message: Message, data: st.DataObject) -> None:
    """Without one of its fields a message decodes with that field's default, or raises
    ProtocolError when the field has none (and always without its type)."""
    wire = wire_of(message)
    field = data.draw(st.sampled_from(sorted(wire)))
    del wire[field]
    defaults = {
        f.name: default_of(f) for f in attrs.fields(type(message)) if f.default is not attrs.NOTHING
    }

    if field == "type" or field not in defaults:
        try:
            decode(orjson.dumps(wire))
        except ProtocolError:
            return
        raise AssertionError(f"{type(message).__name__} without {field!r} decoded")
    assert attrs.evolve(message, **{field: defaults[field]}) == decode(orjson.dumps(wire))


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.data(), JSON_VALUES)
def test_a_retyped_field_decodes_to_a_stable_message_or_raises(
    message: Message, data: st.DataObject, value: Any
) -> None:
    """A field replaced by any JSON value gives ProtocolError or a message of the same type
    that survives another round trip; never another error."""
    wire = wire_of(message)
    wire[data.draw(st.sampled_from(sorted(wire)))] = value

    decoded = decodes_sanely(orjson.dumps(wire))

    if decoded is not None:
        assert wire["type"] == decoded.TYPE
        assert decoded == decode(encode(decoded))


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"heartbeat","ts":1e300}',
        '{"type":"heartbeat","ts":-1e19}',
        '{"type":"http_proxy_response_headers","request_id":"r","status":1.8446744073709552e19}',
    ],
)
def test_a_number_no_peer_can_hold_raises_protocol_error(text: str) -> None:
    """A float too large for a 64-bit integer field raises ProtocolError instead of decoding
    to a message that can not be encoded again (found by the retyped-field fuzzer)."""
    with pytest.raises(ProtocolError):
        decode(text)


# --- binary frames --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_unpack_frame_splits_any_bytes_or_raises_protocol_error(frame: bytes) -> None:
    """Any bytes unpack into (kind, id, payload) that rebuild the frame, or raise
    ProtocolError."""
    try:
        kind, request_id, payload = unpack_frame(frame)
    except ProtocolError:
        return

    assert frame == pack_frame(kind, request_id, payload)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=255), st.text(max_size=100), st.binary(max_size=300))
def test_frames_round_trip_or_refuse_long_ids(kind: int, request_id: str, payload: bytes) -> None:
    """pack_frame then unpack_frame gives back kind, id and payload; an id over 255 UTF-8
    bytes raises ProtocolError instead."""
    try:
        frame = pack_frame(kind, request_id, payload)
    except ProtocolError:
        assert len(request_id.encode()) > 255
        return

    unpacked_kind, unpacked_id, unpacked = unpack_frame(frame)
    assert (kind, request_id, payload) == (unpacked_kind, unpacked_id, bytes(unpacked))


# --- a live worker socket fed garbage -------------------------------------------------------

#: Worker-to-server messages, whole or with a field mangled, as JSON text.
_MANGLED = st.builds(
    lambda message, key, value, mangle: orjson.dumps(
        {**wire_of(message), key: value} if mangle else wire_of(message)
    ).decode(),
    st.one_of(
        st.builds(ResponseHeaders, TEXT, INTS, HEADERS),
        st.builds(ResponseChunk, TEXT, st.binary(max_size=64)),
        st.builds(ResponseEnd, TEXT),
        st.builds(ModelsUpdate, STRINGS),
        st.builds(StatusUpdate, st.sampled_from(["ready", "draining", "not_ready", "?"])),
        st.builds(Heartbeat, INTS),
        st.builds(Cancel, TEXT),
    ),
    st.sampled_from(["type", "request_id", "status", "data", "models", "ts", "extra"]),
    JSON_VALUES,
    st.booleans(),
)
GARBAGE: st.SearchStrategy[str | bytes] = st.one_of(
    st.binary(max_size=256),
    st.builds(pack_frame, st.integers(0, 255), st.text(max_size=20), st.binary(max_size=64)),
    st.text(max_size=256),
    JSON_VALUES.map(lambda v: orjson.dumps(v).decode()),
    _MANGLED,
)


def invalid(frame: str | bytes) -> bool:
    """Whether ``frame`` could never be valid from a worker that was sent no request: these,
    and only these, count towards disconnecting it."""
    if isinstance(frame, bytes):
        return True  # a binary frame can only be a chunk of a request: there is none
    try:
        message = decode(frame)
    except ProtocolError:
        return True
    if message is None:
        return False  # a type from a newer peer: ignored, never garbage
    if isinstance(message, ModelsUpdate):
        try:
            check_models(message.models, max_models=ServeConfig().max_models_per_worker)
        except Invalid:
            return True
        return False
    return not isinstance(message, (Heartbeat, StatusUpdate))


def ignored(frame: str | bytes) -> bool:
    """Whether the server counts ``frame`` in llamapool_worker_messages_ignored_total: the
    invalid ones and those of a type it does not know."""
    if isinstance(frame, str):
        with contextlib.suppress(ProtocolError):
            if decode(frame) is None:
                return True
    return invalid(frame)


_IGNORED_TOTAL = re.compile(r"^llamapool_worker_messages_ignored_total (\S+)$", re.MULTILINE)


async def ignored_total(http: aiohttp.ClientSession, server: PoolServer) -> int:
    """llamapool_worker_messages_ignored_total, as /metrics shows it."""
    async with http.get(server.url + "/metrics") as resp:
        found = _IGNORED_TOTAL.search(await resp.text())
    assert found is not None
    return int(float(found.group(1)))


async def connect_garbage_worker(
    http: aiohttp.ClientSession, server: PoolServer, worker_id: str
) -> aiohttp.ClientWebSocketResponse[bool]:
    """A raw socket registered as a worker with the test key (binary frames on)."""
    ws = await http.ws_connect(server.ws_url)
    register = Register(
        worker_id=worker_id,
        worker_key=WORKER_KEY,
        models=["garbage-model"],
        protocol=1,
        features=["binary_frames", "models_update", "status_update"],
    )
    await ws.send_str(encode(register))
    answer = await ws.receive(timeout=5)
    assert isinstance(decode(answer.data), Registered)
    return ws


async def send(ws: aiohttp.ClientWebSocketResponse[bool], frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)


async def assert_pool_serves(http: aiohttp.ClientSession, server: PoolServer) -> None:
    """A chat request through the pool's demo worker still succeeds."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "still there?"}]}
    async with http.post(
        server.url + "/v1/chat/completions", json=body, headers=server.auth
    ) as resp:
        answer = await resp.json()
    assert (200, "echo: still there?") == (
        resp.status,
        answer["choices"][0]["message"]["content"],
    )


_COUNTER = itertools.count()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(GARBAGE, max_size=MAX_INVALID // 2))
async def test_garbage_from_a_worker_is_ignored_and_counted(
    pool_server: PoolServer, start_worker: StartWorker, frames: list[str | bytes]
) -> None:
    """Random text and binary frames from a registered worker are ignored and counted in
    llamapool_worker_messages_ignored_total; the server keeps serving everyone else."""
    if not pool_server.pool.get("demo-worker"):
        await start_worker(pool_server, "demo", worker_id="demo-worker")
    worker_id = f"garbage-{next(_COUNTER)}"

    async with aiohttp.ClientSession() as http:
        before = await ignored_total(http, pool_server)
        ws = await connect_garbage_worker(http, pool_server, worker_id)
        for frame in frames:
            await send(ws, frame)
        await ws.send_str(encode(Heartbeat(ts=0)))  # then a message that is always fine
        async with http.get(pool_server.url + "/healthz") as resp:
            assert 200 == resp.status
        await ws.close()
        await wait_for(lambda: pool_server.pool.get(worker_id) is None, what="the worker to go")
        after = await ignored_total(http, pool_server)
        await assert_pool_serves(http, pool_server)

    assert sum(map(ignored, frames)) == after - before


@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_a_worker_sending_too_much_garbage_is_disconnected(
    pool_server: PoolServer, start_worker: StartWorker, data: st.DataObject
) -> None:
    """The message that takes a worker past MAX_INVALID invalid ones in a window gets its
    socket closed with 4002 (not 1008: its key is fine, it may reconnect) and drops it from
    the pool; messages of unknown types in between never count; other workers keep serving."""
    if not pool_server.pool.get("demo-worker"):
        await start_worker(pool_server, "demo", worker_id="demo-worker")
    worker_id = f"garbage-{next(_COUNTER)}"

    async with aiohttp.ClientSession() as http:
        before = await ignored_total(http, pool_server)
        ws = await connect_garbage_worker(http, pool_server, worker_id)
        count = ignored_count = 0
        while count <= MAX_INVALID:
            frame = data.draw(GARBAGE)
            await send(ws, frame)
            count += invalid(frame)
            ignored_count += ignored(frame)
        closed = await ws.receive(timeout=5)
        await wait_for(lambda: pool_server.pool.get(worker_id) is None, what="the worker to go")
        after = await ignored_total(http, pool_server)
        await assert_pool_serves(http, pool_server)
        await ws.close()

    assert (WSMsgType.CLOSE, 4002, "too many invalid messages") == (
        closed.type,
        closed.data,
        closed.extra,
    )
    assert ignored_count == after - before


async def test_a_text_frame_that_is_not_utf8_ends_only_that_worker(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A text frame with invalid UTF-8 closes that worker's socket (1007); the server and the
    other workers carry on."""
    await start_worker(pool_server, "demo", worker_id="demo-worker")

    async with aiohttp.ClientSession() as http:
        ws = await connect_garbage_worker(http, pool_server, "bad-utf8")
        await ws.send_frame(b'{"type":"heartbeat","ts":1,"x":"\xff\xfe"}', WSMsgType.TEXT)
        closed = await ws.receive(timeout=5)
        await wait_for(lambda: pool_server.pool.get("bad-utf8") is None, what="the worker to go")
        await assert_pool_serves(http, pool_server)

    assert (WSMsgType.CLOSE, 1007) == (closed.type, closed.data)
