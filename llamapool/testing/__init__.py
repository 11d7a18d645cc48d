"""Helpers for testing llamapool and its backend plugins against real HTTP servers.

The fakes are small aiohttp applications that imitate Ollama, vLLM and Open WebUI closely
enough for a worker or a plugin to talk to them, and record what they receive. Run them with
pytest-aiohttp's ``aiohttp_server`` fixture, or with :func:`serve_app` anywhere else::

    async with serve_app(create_fake_ollama_app(models=["llama3:8b"])) as url:
        ...  # point a worker or a plugin at url
"""

from __future__ import annotations

from llamapool.testing.fakes import (
    FakeLog,
    RecordedRequest,
    Replay,
    create_broken_app,
    create_fake_ollama_app,
    create_fake_openwebui_app,
    create_fake_vllm_app,
    create_replay_app,
    fake_log,
    serve_app,
    url_of,
)

__all__ = [
    "FakeLog",
    "RecordedRequest",
    "Replay",
    "create_broken_app",
    "create_fake_ollama_app",
    "create_fake_openwebui_app",
    "create_fake_vllm_app",
    "create_replay_app",
    "fake_log",
    "serve_app",
    "url_of",
]
