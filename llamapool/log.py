"""Logging through structlog: JSON lines for machines, a readable console for people.

structlog events and the standard library's records (aiohttp logs there) share one set of
handlers, so both reach stderr and, with a log directory, a rotating JSON file.
Secrets are masked by a processor on the way out, as defense in depth: code should never log a
key, but if it does, the value does not reach a terminal or a file.

A structlog event goes from its processors straight to the handlers, which render it and
write the line: the standard library's records, formatters and locks are for the records of
other libraries only. A request logs two lines (the access log and ``request_done``), so this
is on the path of every request: about 8 µs a line instead of 35.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import logging
import logging.handlers
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from llamapool.errors import ConfigError
from llamapool.memo import Remembered

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
_installed: list[_LineHandler] = []


@attrs.frozen(kw_only=True)
class LogSettings:
    """How a process logs: the level, the stderr format and an optional directory for files."""

    level: str = "info"
    format: LogFormat = "auto"
    dir: Path | None = None


def _names_a_secret(name: str) -> bool:
    """Whether a field named ``name`` may hold a credential (``worker_key``, ``Authorization``)."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


#: :func:`_names_a_secret`, remembered: a log line asks it of each of its field names, and those
#: are few.
is_secret_name = Remembered(_names_a_secret)


#: Values that hold nothing nested: returned as they are, the common case of a log field.
_PLAIN = frozenset({str, int, float, bool, type(None)})
#: Values kept even in a field named like a secret: ``prompt_tokens=12`` is a count.
_COUNTS = frozenset({int, float, bool, type(None)})


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every field named like a secret with ``***``, nested ones included.

    Numbers are left alone: ``prompt_tokens=12`` is a count, not a credential.
    """
    names = is_secret_name.memo
    for name, value in event_dict.items():
        secret = names.get(name)
        if secret is None:
            secret = is_secret_name(name)
        if secret:
            event_dict[name] = _masked(value)
        elif type(value) not in _PLAIN:
            event_dict[name] = _redacted(value)
    return event_dict


def _masked(value: object) -> object:
    if type(value) in _COUNTS or isinstance(value, (bool, int, float)):
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


class _IsoTimestamp:
    """structlog's ``TimeStamper(fmt="iso", utc=True)`` at half the cost (0.5 µs, not 1.2, on
    two lines of every request): the date and time of day are formatted once a second, and
    a line adds its microseconds (always six digits, where ``isoformat`` drops them at .0)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}{int((now - second) * 1_000_000):06d}Z"
        return event_dict


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
        _IsoTimestamp(),
        redact_secrets,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.StackInfoRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _EVENTS,
        cache_logger_on_first_use=False,
    )
    # Records from other libraries also get a level, a time, a logger name and redaction.
    foreign: list[Processor] = [structlog.stdlib.add_logger_name, *shared]
    handlers: list[_LineHandler] = [_LineHandler(_Stderr(), json=stderr_json, foreign=foreign)]
    if log_dir is not None:
        file = _rotating_file(Path(log_dir) / file_name, max_bytes=max_bytes, backups=backup_count)
        handlers.append(_LineHandler(file, json=True, foreign=foreign))
    _install(handlers, numeric)


def _stderr_is_tty() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


#: Console tracebacks without local variables: a frame's locals may hold keys.
_TRACEBACKS = (
    structlog.dev.RichTracebackFormatter(show_locals=False)
    if importlib.util.find_spec("rich") is not None
    else structlog.dev.plain_traceback
)


def _rotating_file(path: Path, *, max_bytes: int, backups: int) -> _RotatingFile:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _RotatingFile(path, max_bytes=max_bytes, backups=backups)
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


def _install(handlers: list[_LineHandler], level: int) -> None:
    _BATCH.flush()  # the old handlers' lines leave before they close
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


class _Stderr:
    """Writes to whatever ``sys.stderr`` is when a line comes, not when it was created.

    A test runner or a daemonizer may swap ``sys.stderr``; holding the old stream would then
    write to a closed file.
    """

    def write(self, line: str) -> None:
        stream = sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        pass


class _RotatingFile:
    """A log file that moves to ``name.1`` (``name.1`` to ``name.2``, and so on, keeping
    ``backups``) before a line would take it past ``max_bytes``."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        with self._lock:
            if self._size and self.max_bytes and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("ab")
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _LineHandler(logging.Handler):
    """One destination of log lines (stderr or a file) in one format.

    The standard library's records come through :meth:`emit`, formatted by structlog's
    ``ProcessorFormatter``; structlog events through :meth:`event`, rendered directly.
    """

    def __init__(self, out: _Stderr | _RotatingFile, *, json: bool, foreign: list[Processor]):
        super().__init__()
        self.out = out
        render: list[Processor] = (
            [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(_dumps)]
            if json
            else [
                structlog.dev.ConsoleRenderer(
                    colors=_stderr_is_tty(), exception_formatter=_TRACEBACKS
                )
            ]
        )
        self._render = render
        self.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
                foreign_pre_chain=foreign,
            )
        )

    def event(self, event_dict: EventDict) -> None:
        line: Any = event_dict
        for processor in self._render:
            line = processor(None, "", line)
        _BATCH.add(self.out, line)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _BATCH.add(self.out, self.format(record))
        except Exception:  # as the standard library's handlers do: a log line never raises
            self.handleError(record)

    def close(self) -> None:
        self.out.close()
        super().close()


class _Batch:
    """Lines logged in one turn of the main thread's event loop leave together once the turn
    ends: one write per destination, not one per line (a request logs two lines; 1,000
    requests ending together, 2,000). Without a running loop, or in another thread, a line
    is written at once. What a closed loop left behind leaves with the next line, or at exit.
    """

    def __init__(self) -> None:
        self._lines: dict[_Stderr | _RotatingFile, list[str]] = {}
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def add(self, out: _Stderr | _RotatingFile, line: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            _write(out, line)  # the batch is the main thread's
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # what a loop left behind goes first
            _write(out, line)
            return
        if self._scheduled_on is not loop:
            loop.call_soon(self.flush)
            self._scheduled_on = loop
        self._lines.setdefault(out, []).append(line)

    def flush(self) -> None:
        lines, self._lines = self._lines, {}
        self._scheduled_on = None
        for out, batch in lines.items():
            _write(out, "\n".join(batch))


def _write(out: _Stderr | _RotatingFile, text: str) -> None:
    try:
        out.write(text)
    except Exception:  # as the standard library's handlers do: say so, never raise
        if logging.raiseExceptions and sys.__stderr__ is not None:
            traceback.print_exc(file=sys.__stderr__)


_BATCH = _Batch()
atexit.register(_BATCH.flush)


class _Events:
    """What structlog's loggers write to: each event goes to every installed handler, each
    rendering it in its own format (the last one gets the event itself, the others a copy,
    since rendering takes the exception out of it)."""

    def emit(self, **event_dict: Any) -> None:
        handlers = _installed
        for handler in handlers[:-1]:
            handler.event(dict(event_dict))
        if handlers:
            handlers[-1].event(event_dict)

    debug = info = warning = warn = error = critical = exception = fatal = msg = log = emit


_EVENTS = _Events()


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
