"""URLs in logs, error messages and ``/status``: the credentials an operator may put in one
(``SERVER_URL``, ``BACKEND_URL``, an MCP server's URL) never show."""

from __future__ import annotations

import pytest

from llamapool.urls import url_for_logs, without_credentials


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8000/mcp", "http://127.0.0.1:8000/mcp"),
        ("https://bob:pw@h.example/sse?key=k#f", "https://h.example/sse"),
        ("http://tok@[::1]:81/a/b?x", "http://[::1]:81/a/b"),
        ("http://u:p@w@h:1/", "http://h:1/"),
    ],
)
def test_a_url_on_its_own_shows_scheme_host_port_and_path(url: str, shown: str) -> None:
    assert shown == url_for_logs(url)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("ws://user:pw@pool:8080/workers/connect", "ws://***@pool:8080/workers/connect"),
        ("ws://pool/workers/connect?token=t0k", "ws://pool/workers/connect?***"),
        (
            "GET http://admin:pw@gpu:11434/api/tags?key=k failed: refused",
            "GET http://***@gpu:11434/api/tags?*** failed: refused",
        ),
        ("wss://token@pool/workers/connect", "wss://***@pool/workers/connect"),
        ("cannot reach 'http://h/sse?key=k'", "cannot reach 'http://h/sse?***'"),
        ("write to ops@example.com? soon", "write to ops@example.com? soon"),
        ("http://***@gpu:11434", "http://***@gpu:11434"),
    ],
)
def test_in_a_text_every_urls_userinfo_and_query_are_hidden(text: str, shown: str) -> None:
    """Where a URL is quoted among other words (an error of aiohttp's), its ``user:password@``
    and its query are hidden, and the rest of the text is left alone."""
    assert shown == without_credentials(text)
