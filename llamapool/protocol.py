"""The worker wire protocol, v1: one tagged union of attrs classes and one converter.

Every message is a JSON text frame with a ``type`` field, exactly as Go llamapool peers send and
expect them; ``bytes`` fields travel as base64 strings (Go's encoding of ``[]byte``). Unknown
types decode to ``None`` and are ignored, which is how extensions stay compatible: a Go peer
never sees a binary frame or an extension message because it never advertises the features
that enable them.

Between two llamapool-py peers, bodies travel as binary WebSocket frames instead (see
:func:`pack_frame`): a one-byte kind, the request id, then the raw bytes, never base64-encoded.

MCP relays (``llamapool mcp``) use the same socket and ``register`` with ``kind: "mcp"``,
``mcp_id`` (the public endpoint id), ``mcp_token_sha256`` (hex SHA-256 of the endpoint's extra
client token, or empty) and ``mcp_call_timeout`` (seconds, 0: the server's default);
``max_concurrency`` is the relay's session limit. Then, in both directions, per public MCP
session (the server's ``Mcp-Session-Id``):

- ``mcp_open {session}`` (server to relay): start one upstream MCP session;
- ``mcp_message {session, data}``: one JSON-RPC message, ``data`` its JSON text, relayed as is;
- ``mcp_close {session, reason}``: the session is over (from the server: stop the upstream,
  cancelling its calls; from the relay: the upstream died or refused).

A relay drains with ``status_update`` ``draining``; heartbeats are a worker's. Only a relay
registers that way, so a Go peer never sees these messages.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any, ClassVar, TypeAlias

import attrs
import cattrs
import orjson

from llamapool.errors import ProtocolError

PROTOCOL_VERSION = 1

#: Bodies travel as binary frames instead of base64 in JSON.
FEATURE_BINARY_FRAMES = "binary_frames"
#: The worker may send ``models_update`` when its backend's model list changes.
FEATURE_MODELS_UPDATE = "models_update"
#: The worker may send ``status_update`` (draining, backend down, ready again).
FEATURE_STATUS_UPDATE = "status_update"
#: Per-request flow control: the worker sends at most the bytes the server granted.
FEATURE_FLOW_CONTROL = "flow_control"
#: Every feature this implementation speaks; a connection uses those both sides name.
FEATURES: tuple[str, ...] = (
    FEATURE_BINARY_FRAMES,
    FEATURE_MODELS_UPDATE,
    FEATURE_STATUS_UPDATE,
    FEATURE_FLOW_CONTROL,
)

#: WebSocket close codes. 1008 is Go's: the worker's key (or its register message) was refused,
#: so a worker that gets it with the reason ``unauthorized`` stops instead of retrying.
CLOSE_POLICY = 1008
#: Going away: server shutdown, a replaced or evicted connection. The worker reconnects.
CLOSE_GOING_AWAY = 1001
#: The worker sent too many messages that could never be valid; it should reconnect clean.
CLOSE_INVALID_MESSAGES = 4002
#: The worker key's ``max_workers`` workers are connected: the worker retries later.
CLOSE_KEY_FULL = 4003
#: Another connected worker holds this worker id (see :attr:`Register.instance`).
CLOSE_ID_IN_USE = 4009
#: The close reason that says the worker key was refused (Go's wording).
REASON_UNAUTHORIZED = "unauthorized"

#: ``status_update`` values.
STATUS_READY = "ready"
STATUS_DRAINING = "draining"
STATUS_NOT_READY = "not_ready"


@attrs.frozen
class WireError:
    """Why a proxied request failed, as carried by ``http_proxy_response_end``."""

    code: str
    message: str


# --- worker to server -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Register:
    """First message of a worker; ``token`` is the legacy name of ``worker_key``."""

    TYPE: ClassVar[str] = "register"
    worker_id: str = ""
    worker_name: str = ""
    worker_key: str = ""
    token: str = ""
    models: list[str] = attrs.Factory(list)
    max_concurrency: int = 1
    # Extensions, ignored by Go servers.
    version: str = ""
    build_sha: str = ""
    build_date: str = ""
    backend: str = ""
    protocol: int = 0
    features: list[str] = attrs.Factory(list)
    #: Public API paths the worker's backend serves; empty means "all" (a Go worker).
    paths: list[str] = attrs.Factory(list)
    #: A random secret the worker process made at start. A register with the id of a
    #: connected worker replaces that connection only when it carries the same secret: the
    #: same process coming back on a new link, not anyone else holding the worker key.
    instance: str = attrs.field(default="", repr=False)
    #: ``"mcp"`` for an MCP relay (see the module docstring); empty for a worker.
    kind: str = ""
    mcp_id: str = ""
    mcp_token_sha256: str = attrs.field(default="", repr=False)
    mcp_call_timeout: int = 0

    @property
    def key(self) -> str:
        return self.worker_key or self.token


@attrs.frozen
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    ts: int


@attrs.frozen
class ResponseHeaders:
    TYPE: ClassVar[str] = "http_proxy_response_headers"
    request_id: str
    status: int
    headers: dict[str, str] = attrs.Factory(dict)


@attrs.frozen
class ResponseChunk:
    TYPE: ClassVar[str] = "http_proxy_response_chunk"
    request_id: str
    data: bytes


@attrs.frozen
class ResponseEnd:
    TYPE: ClassVar[str] = "http_proxy_response_end"
    request_id: str
    error: WireError | None = None


@attrs.frozen
class ModelsUpdate:
    """Extension: the backend's model list changed (only sent to servers that accept it)."""

    TYPE: ClassVar[str] = "models_update"
    models: list[str]


@attrs.frozen
class StatusUpdate:
    """Extension: the worker is ``ready``, ``draining`` (finishing, taking nothing new) or
    ``not_ready`` (its backend is down)."""

    TYPE: ClassVar[str] = "status_update"
    status: str


# --- server to worker -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ProxyRequest:
    """One client request for the worker to replay against its backend.

    With binary frames, ``body`` is empty here and ``body_len`` bytes follow in one
    :data:`FRAME_REQUEST_BODY` frame.
    """

    TYPE: ClassVar[str] = "http_proxy_request"
    request_id: str
    method: str
    path: str
    headers: dict[str, str] = attrs.Factory(dict)
    stream: bool = False
    body: bytes = b""
    body_len: int = 0
    #: With flow control: response bytes the worker may send before it gets more credit.
    window: int = 0
    #: Set when the server chose this worker through a model alias: the model the worker's
    #: backend knows, to put in the body in place of the one the client asked for.
    model: str = ""


@attrs.frozen
class Cancel:
    TYPE: ClassVar[str] = "http_proxy_cancel"
    request_id: str


@attrs.frozen
class Credit:
    """Extension: the client consumed ``bytes`` more of the response; the worker may send
    that much more."""

    TYPE: ClassVar[str] = "http_proxy_credit"
    request_id: str
    bytes: int


@attrs.frozen(kw_only=True)
class Registered:
    """Extension: the server accepted a register and names the features it will use."""

    TYPE: ClassVar[str] = "registered"
    features: list[str] = attrs.Factory(list)
    version: str = ""


@attrs.frozen
class McpOpen:
    """Extension, server to MCP relay: start an upstream session for public ``session``."""

    TYPE: ClassVar[str] = "mcp_open"
    session: str


@attrs.frozen
class McpMessage:
    """Extension, both ways: one JSON-RPC message (its JSON text) of an MCP session."""

    TYPE: ClassVar[str] = "mcp_message"
    session: str
    data: str


@attrs.frozen
class McpClose:
    """Extension, both ways: an MCP session is over, and why."""

    TYPE: ClassVar[str] = "mcp_close"
    session: str
    reason: str = ""


Message: TypeAlias = (
    Register
    | Heartbeat
    | ResponseHeaders
    | ResponseChunk
    | ResponseEnd
    | ModelsUpdate
    | StatusUpdate
    | ProxyRequest
    | Cancel
    | Credit
    | Registered
    | McpOpen
    | McpMessage
    | McpClose
)

_CLASSES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Heartbeat,
        ResponseHeaders,
        ResponseChunk,
        ResponseEnd,
        ModelsUpdate,
        StatusUpdate,
        ProxyRequest,
        Cancel,
        Credit,
        Registered,
        McpOpen,
        McpMessage,
        McpClose,
    )
}


def _structure_bytes(value: Any, _: type) -> bytes:
    if value is None:  # Go encodes a nil []byte as null
        return b""
    if not isinstance(value, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(value, validate=True)


def _structure_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    number = int(value)
    if not -(2**63) <= number < 2**64:  # a float can say 1e300; no peer holds it, nor can we
        raise ValueError(f"number out of range: {value}")
    return number


def _structure_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _structure_str_list(value: Any, _: type) -> list[str]:
    # cattrs alone would turn a string into a list of its characters
    if value is None:  # Go encodes a nil slice as null
        return []
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return [_structure_str(item, str) for item in value]


def _structure_headers(value: Any, _: type) -> dict[str, str]:
    if value is None:  # Go encodes a nil map as null
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return {_structure_str(k, str): _structure_str(v, str) for k, v in value.items()}


converter = cattrs.Converter(forbid_extra_keys=False)
converter.register_structure_hook(bytes, _structure_bytes)
converter.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode("ascii"))
converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(bool, _structure_bool)
converter.register_structure_hook_func(lambda t: t == list[str], _structure_str_list)
converter.register_structure_hook_func(lambda t: t == dict[str, str], _structure_headers)


def encode(message: Message) -> str:
    """Serialize one message to the JSON text a WebSocket text frame carries."""
    data = converter.unstructure(message)
    if isinstance(message, ResponseEnd) and message.error is None:
        del data["error"]  # Go omits an empty error
    if isinstance(message, ProxyRequest):  # extension fields stay off the wire when unused
        for extension in ("body_len", "window", "model"):
            if not data[extension]:
                del data[extension]
    if isinstance(message, Register) and not message.kind:  # a worker's: no MCP fields
        for extension in ("kind", "mcp_id", "mcp_token_sha256", "mcp_call_timeout"):
            del data[extension]
    data["type"] = message.TYPE
    return orjson.dumps(data).decode()


def decode(text: str | bytes) -> Message | None:
    """Parse one text frame; ``None`` for a well-formed message of a type we do not know.

    Raises :class:`ProtocolError` for anything else: not JSON, not an object, no ``type``,
    or fields of the wrong type.
    """
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("message is not a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message has no string 'type'")
    cls = _CLASSES.get(kind)
    if cls is None:
        return None
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, binascii.Error, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind!r} message: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    return str(exc)


def with_model(body: bytes, model: str) -> bytes:
    """``body`` asking for ``model`` instead: used only when a request is routed through a
    model alias (``llama3:8b-q4_0`` served by ``llama3:8b``); every other body is relayed
    untouched."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(data, dict) or data.get("model") == model:
        return body
    data["model"] = model
    return orjson.dumps(data)


# --- binary frames (llamapool-py peers only) ------------------------------------------------

#: Server to worker: the body of the ``http_proxy_request`` with the same id.
FRAME_REQUEST_BODY = 1
#: Worker to server: one chunk of the response body.
FRAME_RESPONSE_CHUNK = 2

_HEADER = struct.Struct("!BB")


def pack_frame(kind: int, request_id: str, payload: bytes | memoryview) -> bytes:
    """Build a binary frame: kind (1 byte), id length (1 byte), id (UTF-8), raw payload."""
    rid = request_id.encode()
    if len(rid) > 255:
        raise ProtocolError("request id longer than 255 bytes")
    return b"".join((_HEADER.pack(kind, len(rid)), rid, payload))


def unpack_frame(frame: bytes) -> tuple[int, str, memoryview]:
    """Split a binary frame without copying its payload."""
    if len(frame) < _HEADER.size:
        raise ProtocolError("binary frame shorter than its header")
    kind, id_len = _HEADER.unpack_from(frame)
    start = _HEADER.size + id_len
    if len(frame) < start:
        raise ProtocolError("binary frame shorter than its request id")
    try:
        request_id = frame[_HEADER.size : start].decode()
    except UnicodeDecodeError:
        raise ProtocolError("binary frame request id is not UTF-8") from None
    return kind, request_id, memoryview(frame)[start:]
