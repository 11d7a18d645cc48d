"""URLs as logs, error messages and ``/status`` may show them: without the credentials an
operator may have put in one (``SERVER_URL``, ``BACKEND_URL``, an MCP server's URL), which the
log's secret-named fields (``log.redact_secrets``) do not cover."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

#: The userinfo of a URL (``user:password@`` after ``scheme://``), wherever it sits in a text.
_USERINFO = re.compile(r"(?<=://)[^/?#@\s]*@")
#: The query of a URL (``?key=...``), wherever it sits in a text.
_QUERY = re.compile(r"(?<=[^\s])(://[^\s?#]*)\?[^\s#\"']*")
HIDDEN = "***"


def url_for_logs(url: str) -> str:
    """``url`` as ``scheme://host:port/path``: without its userinfo, query and fragment,
    which may hold credentials (``http://user:password@host/sse?key=...``)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def without_credentials(text: str) -> str:
    """``text`` with the userinfo and the query of every URL in it hidden:
    ``GET http://admin:pw@host/tags?key=k failed`` becomes ``GET http://***@host/tags?*** failed``.

    For texts that quote a URL among other words (an error of aiohttp's); a URL on its own is
    shown by :func:`url_for_logs`.
    """
    if "://" not in text:
        return text
    if "@" in text:
        text = _USERINFO.sub(HIDDEN + "@", text)
    if "?" in text:
        text = _QUERY.sub(rf"\1?{HIDDEN}", text)
    return text
