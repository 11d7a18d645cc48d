"""Logging through structlog: JSON lines for machines, a readable console for people.

structlog events and the standard library's records (aiohttp logs there) share one set of
handlers, so both reach stderr and, with a log directory, a rotating JSON file.
Secrets are masked by a processor on the way out, as defense in depth: code should never log a
key, but if it does, the value does not reach a terminal or a file.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from llamapool.errors import ConfigError

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "warn", "error")

#: Rotate a log file at this size, keeping this many old ones (``worker.log.1`` ...).
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5

REDACTED = "***"
_SECRET_WORDS = ("key", "token", "authorization", "secret", "password")

#: Libraries whose records below WARNING are theirs, not ours, to show.
_QUIETED = ("aiohttp", "asyncio")
#: Handlers this module installed, so configuring again replaces them and nothing else.
_installed: list[logging.Handler] = []


@attrs.frozen(kw_only=True)
class LogSettings:
    """How a process logs: the level, the stderr format and an optional directory for files."""

    level: str = "info"
    format: LogFormat = "auto"
    dir: Path | None = None


@functools.lru_cache(maxsize=1024)
def is_secret_name(name: str) -> bool:
    """Whether a field named ``name`` may hold a credential (``worker_key``, ``Authorization``).

    Remembered: every log line asks it of each of its field names, and those are few.
    """
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


#: Values that hold nothing nested: returned as they are, the common case of a log field.
_PLAIN = frozenset({str, int, float, bool, type(None)})


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every field named like a secret with ``***``, nested ones included.

    Numbers are left alone: ``prompt_tokens=12`` is a count, not a credential.
    """
    for name, value in event_dict.items():
        if name == "event":
            continue
        if is_secret_name(name):
            event_dict[name] = _masked(value)
        elif type(value) not in _PLAIN:
            event_dict[name] = _redacted(value)
    return event_dict


def _masked(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return REDACTED


def _redacted(value: object) -> object:
    if isinstance(value, Mapping):
        return {
            k: _masked(v) if isinstance(k, str) and is_secret_name(k) else _redacted(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)) and any(
        isinstance(v, (Mapping, list, tuple)) for v in value
    ):
        return [_redacted(v) for v in value]
    return value


def configure_logging(
    level: str = "info",
    *,
    fmt: LogFormat = "auto",
    log_dir: Path | str | None = None,
    file_name: str = "llamapool.log",
    max_bytes: int = MAX_BYTES,
    backup_count: int = BACKUP_COUNT,
) -> None:
    """Send structlog and stdlib logging to stderr and, given ``log_dir``, to a rotating file.

    ``fmt="auto"`` writes JSON unless stderr is a terminal; the file is always JSON.
    Calling this again replaces what an earlier call installed.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError(f"unknown log level {level!r} (one of {', '.join(LOG_LEVELS)})")
    stderr_json = fmt == "json" or (fmt == "auto" and not _stderr_is_tty())
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # Records from other libraries also get a level, a time, a logger name and redaction.
    foreign: list[Processor] = [structlog.stdlib.add_logger_name, *shared]
    stderr = _StderrHandler()
    stderr.setFormatter(_formatter(json=stderr_json, foreign=foreign))
    handlers: list[logging.Handler] = [stderr]
    if log_dir is not None:
        handlers.append(
            _file_handler(Path(log_dir) / file_name, max_bytes=max_bytes, backups=backup_count)
        )
        handlers[-1].setFormatter(_formatter(json=True, foreign=foreign))
    _install(handlers, numeric)


def _stderr_is_tty() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


#: Console tracebacks without local variables: a frame's locals may hold keys.
_TRACEBACKS = (
    structlog.dev.RichTracebackFormatter(show_locals=False)
    if importlib.util.find_spec("rich") is not None
    else structlog.dev.plain_traceback
)


def _formatter(*, json: bool, foreign: list[Processor]) -> logging.Formatter:
    last: list[Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_dumps)]
        if json
        else [
            structlog.dev.ConsoleRenderer(colors=_stderr_is_tty(), exception_formatter=_TRACEBACKS)
        ]
    )
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
        foreign_pre_chain=foreign,
    )


def _file_handler(path: Path, *, max_bytes: int, backups: int) -> logging.Handler:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    except OSError as exc:
        raise ConfigError(f"cannot write logs to {path.parent}: {exc.strerror}") from None


def reset_logging() -> None:
    """Undo :func:`configure_logging`: close its handlers (and files), restore structlog's defaults.

    Tests call it so one test's log file or stream does not outlive it.
    """
    _install([], logging.WARNING)
    for name in _QUIETED:
        logging.getLogger(name).setLevel(logging.NOTSET)
    structlog.reset_defaults()


def _install(handlers: list[logging.Handler], level: int) -> None:
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed[:] = handlers
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name in _QUIETED:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record arrives, not when it was created.

    A test runner or a daemonizer may swap ``sys.stderr``; a handler holding the old stream
    would then write to a closed file.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _dumps(data: object, **_: object) -> str:
    """orjson for log lines: several times faster than json, on every request's summary."""
    return orjson.dumps(data, default=str).decode()


class Throttle:
    """At most one log line per reason per ``interval`` seconds, for what peers can trigger at
    will (malformed requests, a flood of connections): a line per event would let anyone fill
    the disk. The lines held back are counted, and the next line that passes says how many
    (``suppressed=N``).
    """

    #: Reasons remembered at once; past that, new reasons share one slot.
    MAX_REASONS = 256

    def __init__(
        self, interval: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def passes(self, reason: str) -> int | None:
        """``None`` if a line for ``reason`` went out less than ``interval`` ago (this one is
        counted); otherwise how many were held back since that line."""
        if reason not in self._next and len(self._next) >= self.MAX_REASONS:
            reason = "other"
        now = self._clock()
        if now < self._next.get(reason, now):
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return None
        self._next[reason] = now + self.interval
        return self._suppressed.pop(reason, 0)

    def log(
        self, method: Callable[..., object], event: str, *, reason: str, **fields: object
    ) -> None:
        """``method(event, reason=..., suppressed=N, **fields)`` unless held back."""
        suppressed = self.passes(f"{event}/{reason}")
        if suppressed is not None:
            method(event, reason=reason, suppressed=suppressed, **fields)


_log = structlog.get_logger("llamapool")
#: Where an event loop error's own description stops: a repr or call may follow, holding
#: data (``Exception in callback f('...')``); an empty call (``socket.accept()``) stays.
_REPR = re.compile(r"""([<{'"\[]|\((?!\))).*""", re.DOTALL)


def throttled_loop_errors(
    throttle: Throttle,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event loop exception handler that logs one line per kind of error and interval,
    without a traceback for operating-system errors (``socket.accept() out of system
    resource`` can come a thousand times a second when descriptors run out).

    The line says what failed, not with what: reprs of callbacks and exception messages can
    hold request data, so only the exception's type (and an ``OSError``'s ``strerror``) goes.
    A programming error keeps its traceback, at most once per interval.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "unexpected error")
        reason = _REPR.sub("", message).strip()[:80] or "unexpected error"
        exc = context.get("exception")
        if not isinstance(exc, BaseException):
            throttle.log(_log.warning, "event_loop_error", reason=reason)
        elif isinstance(exc, OSError):
            detail = exc.strerror or ""
            error = type(exc).__name__
            throttle.log(
                _log.warning, "event_loop_error", reason=reason, error=error, detail=detail
            )
        else:
            throttle.log(
                _log.error,
                "event_loop_error",
                reason=reason,
                error=type(exc).__name__,
                exc_info=exc,
            )

    return handle
