"""Value types of the command line: durations, byte sizes and listen addresses.

They convert a flag, an environment variable or a file value alike, so one bad value reads the
same wherever it came from; ``format_*`` write defaults the way an operator would.
"""

from __future__ import annotations

import math
import re
from typing import Any

import click

from llamapool.config import MIB, parse_duration
from llamapool.errors import LlamapoolError

#: The longest duration any setting takes: a year. Past it a value is a typo, and an event
#: loop cannot schedule a timer that far (``nan`` and ``inf`` are refused as well).
MAX_DURATION = 365 * 24 * 3600.0
#: The largest size any setting takes.
MAX_SIZE = 1024**4
#: The largest count any setting takes (queued requests, connections, workers, models): past
#: it a value is a typo, and the kernel's open-file limit (``fs.nr_open``, 1,048,576 by
#: default) holds connections below it anyway.
MAX_COUNT = 1_000_000
#: Server processes on one host: one a core.
MAX_PROCESSES = 1024


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, or a Go-style duration such as ``30s``, ``2m`` or ``1m30s``."""

    name = "duration"

    def __init__(self, *, zero: bool = True, forever: bool = False) -> None:
        self.zero = zero  # 0 is allowed (it usually means "none" or "at once")
        self.forever = forever  # -1 is allowed and means "wait forever"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, bool):
            self.fail(f"not a duration: {value!r}", param, ctx)
        try:
            seconds = (
                float(value) if isinstance(value, (int, float)) else parse_duration(str(value))
            )
        except LlamapoolError as exc:
            self.fail(str(exc), param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"not a duration: {value!r} (try 30s, 2m or 1m30s)", param, ctx)
        if seconds > MAX_DURATION:
            self.fail(f"{value!r} is longer than a year (8760h)", param, ctx)
        if seconds == -1 and self.forever:
            return -1.0
        if seconds < 0 or (seconds == 0 and not self.zero):
            least = "0" if self.zero else "more than 0"
            self.fail(f"{value!r} must be {least}" + (" or -1" if self.forever else ""), param, ctx)
        return seconds


class ByteSize(click.ParamType):  # type: ignore[type-arg]
    """Bytes: ``1048576``, ``512KiB``, ``16MiB``, ``1MB`` (10^6), ``16m`` (2^20, like nginx)."""

    name = "size"
    _UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
    _UNITS |= {"k": 1024, "kib": 1024, "m": MIB, "mib": MIB, "g": 1024**3, "gib": 1024**3}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
            unit = match.group(2).lower() if match else ""
            if match is None or unit not in self._UNITS:
                self.fail(f"not a size: {value!r} (try 16MiB, 1MB or 1048576)", param, ctx)
            number = float(match.group(1)) * self._UNITS[unit]
            size = int(number) if number <= MAX_SIZE else MAX_SIZE + 1  # inf: 400 digits
        if size < 1:
            self.fail(f"{value!r} must be at least 1 byte", param, ctx)
        if size > MAX_SIZE:
            self.fail(f"{value!r} is more than {format_size(MAX_SIZE)}", param, ctx)
        return size


class HostPort(click.ParamType):  # type: ignore[type-arg]
    """``host:port`` to listen on (``127.0.0.1:4555``, ``:4555``, ``[::1]:4555``); empty: off."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]*):(\d{1,5})", text)
        if text and (match is None or int(match.group(2)) > 65535):
            self.fail(f"expected host:port such as 127.0.0.1:4555, got {text!r}", param, ctx)
        return text


def format_duration(seconds: float) -> str:
    """``300.0`` as ``5m``: the way an operator would write it."""
    minutes, rest = divmod(int(seconds), 60)
    if seconds != int(seconds) or (minutes and rest) or not minutes:
        return f"{seconds:g}s"
    return f"{minutes}m"


def format_size(size: int) -> str:
    """``16777216`` as ``16MiB``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
