"""Logs: JSON or console on stderr, rotating JSON files in a log directory, secrets masked."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from llamapool.errors import ConfigError
from llamapool.log import (
    REDACTED,
    configure_logging,
    redact_secrets,
    reset_logging,
)

log = structlog.get_logger("llamapool.test")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test's handlers and files are closed when it ends."""
    yield
    reset_logging()


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- redaction ------------------------------------------------------------------------------


def test_redaction_masks_fields_named_like_secrets() -> None:
    """Values of ``*key*``, ``*token*``, ``*authorization*``, ``*secret*`` and ``*password*``
    fields become ``***``, in nested mappings too; numbers and other fields stay."""
    event = {
        "event": "worker_registered",
        "worker_key": "wk-123",
        "api_keys": ("a", "b"),
        "refresh_token": "t",
        "client_secret": "s",
        "DB_PASSWORD": "p",
        "headers": {"Authorization": "Bearer abc", "Content-Type": "application/json"},
        "attempts": [{"token": "x", "n": 1}],
        "prompt_tokens": 12,
        "worker_id": "w-1",
        "backend_api_key": None,
    }

    assert {
        "event": "worker_registered",
        "worker_key": REDACTED,
        "api_keys": REDACTED,
        "refresh_token": REDACTED,
        "client_secret": REDACTED,
        "DB_PASSWORD": REDACTED,
        "headers": {"Authorization": REDACTED, "Content-Type": "application/json"},
        "attempts": [{"token": REDACTED, "n": 1}],
        "prompt_tokens": 12,
        "worker_id": "w-1",
        "backend_api_key": None,
    } == redact_secrets(None, "info", event)


def test_key_never_reaches_a_json_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A log line carrying ``worker_key=...`` shows ``***`` on stderr."""
    configure_logging("info", fmt="json")

    log.info("worker_registered", worker_key="very-secret-key", worker_id="w-1")

    err = capsys.readouterr().err
    assert "very-secret-key" not in err
    (event,) = events(err)
    assert ("worker_registered", REDACTED, "w-1", "info") == (
        event["event"],
        event["worker_key"],
        event["worker_id"],
        event["level"],
    )


# --- stderr ---------------------------------------------------------------------------------


def test_console_format_is_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    """``fmt="console"`` prints readable lines, not JSON, and still masks keys."""
    configure_logging("info", fmt="console")

    log.warning("server_unreachable", url="ws://pool", api_key="k-123")

    err = capsys.readouterr().err
    assert "server_unreachable" in err
    assert "url=ws://pool" in err
    assert "k-123" not in err
    assert not err.startswith("{")


def test_auto_format_is_json_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``fmt="auto"`` writes JSON lines when stderr is captured (not a TTY)."""
    configure_logging("info")

    log.info("server_listening", port=8080)

    assert [("server_listening", 8080)] == [
        (e["event"], e["port"]) for e in events(capsys.readouterr().err)
    ]


def test_a_line_is_stamped_with_the_utc_time_to_the_microsecond(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``timestamp`` is ISO 8601 in UTC with six digits of microseconds, between the times
    taken just before and just after the line."""
    configure_logging("info", fmt="json")

    before = datetime.datetime.now(datetime.timezone.utc)
    log.info("stamped")
    after = datetime.datetime.now(datetime.timezone.utc)

    (stamp,) = [e["timestamp"] for e in events(capsys.readouterr().err)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert before <= datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")) <= after


def test_level_filters_events(capsys: pytest.CaptureFixture[str]) -> None:
    """At ``warning``, info and debug events are dropped."""
    configure_logging("warning", fmt="json")

    log.debug("dropped_debug")
    log.info("dropped_info")
    log.warning("kept_warning")
    log.error("kept_error")

    assert ["kept_warning", "kept_error"] == [e["event"] for e in events(capsys.readouterr().err)]


def test_lines_logged_in_an_event_loop_arrive_whole_and_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The lines of one turn of the event loop leave together (one write), in order, and none
    is lost when the loop ends right after logging it."""
    configure_logging("info", fmt="json")

    async def busy_turns() -> None:
        for n in range(3):
            log.info("tick", n=n)
        await asyncio.sleep(0)
        log.info("last_in_loop")

    asyncio.run(busy_turns())
    in_loop = capsys.readouterr().err
    log.info("after_loop")

    assert ["tick", "tick", "tick", "last_in_loop"] == [e["event"] for e in events(in_loop)]
    assert ["after_loop"] == [e["event"] for e in events(capsys.readouterr().err)]


def test_unknown_level_is_a_config_error() -> None:
    """A level that is not a level is a ConfigError, not a silent fallback."""
    with pytest.raises(ConfigError, match="loud"):
        configure_logging("loud")


# --- files ----------------------------------------------------------------------------------


def test_log_dir_gets_json_lines_as_well_as_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a log directory, events (ours and the stdlib's) go to stderr and to a JSON file."""
    log_dir = tmp_path / "logs" / "nested"
    configure_logging("info", fmt="console", log_dir=log_dir, file_name="server.log")

    log.info("server_listening", port=8080, worker_key="wk")
    logging.getLogger("aiohttp.server").error("Error handling request, token=%s", "t")

    written = events((log_dir / "server.log").read_text(encoding="utf-8"))
    assert [("server_listening", 8080, REDACTED)] == [
        (e["event"], e["port"], e["worker_key"]) for e in written[:1]
    ]
    assert ("aiohttp.server", "error") == (written[1]["logger"], written[1]["level"])
    assert "server_listening" in capsys.readouterr().err


def test_log_files_rotate(tmp_path: Path) -> None:
    """Past ``max_bytes`` the file rotates, keeping ``backup_count`` old files."""
    configure_logging(
        "info", fmt="json", log_dir=tmp_path, file_name="worker.log", max_bytes=400, backup_count=2
    )

    for n in range(40):
        log.info("tick", n=n, padding="x" * 50)

    assert ["worker.log", "worker.log.1", "worker.log.2"] == sorted(
        p.name for p in tmp_path.iterdir()
    )
    last = events((tmp_path / "worker.log").read_text(encoding="utf-8"))[-1]
    assert 39 == last["n"]


def test_configuring_again_closes_the_old_file(tmp_path: Path) -> None:
    """A second configure_logging writes to its own file only."""
    configure_logging("info", fmt="json", log_dir=tmp_path / "a", file_name="x.log")
    log.info("first")
    configure_logging("info", fmt="json", log_dir=tmp_path / "b", file_name="x.log")
    log.info("second")

    assert (["first"], ["second"]) == (
        [e["event"] for e in events((tmp_path / "a" / "x.log").read_text(encoding="utf-8"))],
        [e["event"] for e in events((tmp_path / "b" / "x.log").read_text(encoding="utf-8"))],
    )


def test_unusable_log_dir_is_a_config_error(tmp_path: Path) -> None:
    """A log directory that cannot be created is a ConfigError naming it."""
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")

    with pytest.raises(ConfigError, match="cannot write logs to"):
        configure_logging(log_dir=blocker / "logs")


def test_worker_process_writes_worker_log(tmp_path: Path) -> None:
    """``llamapool work --log-dir`` writes JSON events to worker.log, never its key."""
    log_dir = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k not in ("LOG_DIR", "LOG_LEVEL", "ENV_FILE")}
    env.update(WORKER_KEY="the-worker-key", LOG_FORMAT="console", CONFIG_FILE="")
    args = ["--backend", "demo", "--server-url", "ws://127.0.0.1:9/w", "--log-dir", str(log_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamapool", "work", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log_file = log_dir / "worker.log"
    try:
        deadline = time.monotonic() + 30
        while not (log_file.exists() and log_file.read_text(encoding="utf-8").endswith("\n")):
            assert proc.poll() is None, "the worker exited early"
            assert time.monotonic() < deadline, "nothing was written to worker.log"
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    text = log_file.read_text(encoding="utf-8")
    assert "the-worker-key" not in text
    assert all(isinstance(e["event"], str) for e in events(text))
