"""URLs as logs and error messages may show them."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def url_for_logs(url: str) -> str:
    """``url`` as ``scheme://host:port/path``: without its userinfo, query and fragment,
    which may hold credentials (``http://user:password@host/sse?key=...``)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
