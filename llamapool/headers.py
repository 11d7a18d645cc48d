"""Which HTTP headers may cross the pool, in either direction.

Hop-by-hop headers describe one connection, not the message, so they never cross a proxy
(RFC 9110 section 7.6.1). The client's credentials never reach a backend: the worker adds the
backend's own key instead.

Response headers are served from the pool's own origin, where the dashboard keeps the API key
in the browser, and a worker is only as trusted as its key: so they are allow-listed rather
than deny-listed. What an LLM API response needs passes (its type, caching, the runtime's
rate-limit and request-id headers under their own names); nothing that sets a cookie,
redirects, or changes how a browser treats the origin (CORS, framing, CSP, HSTS) ever does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from llamapool.memo import Remembered

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Request headers that stay on the client's side of the server. The server decodes a
#: compressed body before relaying it, so its Content-Encoding stays behind too.
CLIENT_ONLY = HOP_BY_HOP | {
    "authorization",
    "x-api-key",  # the client's key as Anthropic clients send it
    "cookie",
    "host",
    "content-length",
    "content-encoding",
    "expect",
}

#: Response headers the server recomputes for its own connection to the client.
RECOMPUTED = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}


def forwardable(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> dict[str, str]:
    """A plain dict of the headers not in ``drop`` (names compared case-insensitively).

    Repeated headers are joined with ``", "``, which HTTP allows for every header we relay.
    ``Connection`` never passes, and the headers it names are hop-by-hop too, and dropped with
    it. A value that is not UTF-8 has its invalid bytes replaced by U+FFFD, as Go's JSON
    encoder does: aiohttp keeps them as surrogates, which the wire's JSON cannot carry. One
    pass over the headers: this runs on every request and answer, in the server and in the
    worker.
    """
    result: dict[str, str] = {}
    lowered: dict[str, str] = {}
    hop: set[str] = set()
    for raw_name, value in headers:
        name = str(raw_name)  # aiohttp's names are istr, which JSON encoders reject as keys
        if not value.isascii():
            value = _utf8(value)
        key = name.lower()
        if key == "connection":
            hop.update(token.strip().lower() for token in value.split(","))
        elif key in drop:
            continue
        elif key in lowered:
            result[lowered[key]] += ", " + value
        else:
            lowered[key] = name
            result[name] = value
    if hop:
        return {name: value for name, value in result.items() if name.lower() not in hop}
    return result


def _utf8(value: str) -> str:
    """``value`` as valid UTF-8 text: the bytes aiohttp kept as surrogates (it reads headers
    with ``surrogateescape``) that are not UTF-8 become U+FFFD."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raw = value.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


#: Response headers a worker may send on to the client, by exact (lowercase) name.
RESPONSE_ALLOWED = frozenset(
    {
        "cache-control",
        "content-disposition",  # audio and image endpoints name their files
        "content-language",
        "content-type",
        "etag",
        "expires",
        "last-modified",
        "retry-after",
        "request-id",  # Anthropic's
        "x-accel-buffering",  # keeps SSE unbuffered behind nginx
    }
)
#: ... and by pattern: rate-limit headers (OpenAI's, Anthropic's, the IETF draft's), OpenAI's
#: own (openai-model, openai-processing-ms), and a runtime's request id under its own name
#: (``x-vllm-request-id``, not ``x-request-id``: the pool's own id always wins).
_RESPONSE_ALLOWED = re.compile(
    r"^(x-ratelimit-[a-z0-9-]+|anthropic-ratelimit-[a-z0-9-]+|ratelimit(-policy)?"
    r"|openai-[a-z0-9-]+|x-[a-z0-9]+(-[a-z0-9]+)*-request-id)$"
)


def allowed_response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a worker's response that may reach the client: the allowed ones, less
    any its ``Connection`` header names (hop-by-hop too), repeated names joined
    (:func:`forwardable`). None of :data:`RECOMPUTED` is allowed, so they drop with the rest."""
    known = _allowed.memo  # looked in first: this runs on every header of every response
    kept = [
        (name, value)
        for name, value in headers.items()
        if known.get(key := name.lower()) or (key not in known and _allowed(key))
    ]
    return forwardable(kept, HOP_BY_HOP)


def _judge(key: str) -> bool:
    """Whether a response header (lowercase) may pass; ``Connection`` does, for
    :func:`forwardable` to read."""
    allowed = key in RESPONSE_ALLOWED or key == "connection"
    return allowed or _RESPONSE_ALLOWED.match(key) is not None


#: :func:`_judge`, remembered: it runs on every header of every response, and names come from
#: workers (see :class:`~llamapool.memo.Remembered` for the bounds).
_allowed = Remembered(_judge)
