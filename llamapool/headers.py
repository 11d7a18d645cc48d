"""Which HTTP headers may cross the pool, in either direction.

Hop-by-hop headers describe one connection, not the message, so they never cross a proxy
(RFC 9110 section 7.6.1). The client's credentials never reach a backend: the worker adds the
backend's own key instead.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    Headers that ``Connection`` names are hop-by-hop too, and dropped with it.
    """
    headers = list(headers)
    listed = {
        token.strip().lower()
        for name, value in headers
        if str(name).lower() == "connection"
        for token in value.split(",")
    }
    drop = drop | listed
    result: dict[str, str] = {}
    lowered: dict[str, str] = {}
    for raw_name, value in headers:
        name = str(raw_name)  # aiohttp's names are istr, which JSON encoders reject as keys
        key = name.lower()
        if key in drop:
            continue
        if key in lowered:
            result[lowered[key]] += ", " + value
        else:
            lowered[key] = name
            result[name] = value
    return result
