"""The event loop every llamapool process runs on: uvloop when it is installed, else asyncio's.

uvloop (``pip install llamapool[fast]``) does the same work with less CPU per socket read and
write, which is most of what a relay does; nothing in llamapool depends on it, so without it
the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, cast

Runner = Callable[[Coroutine[Any, Any, None]], None]


def _runner() -> tuple[str, Runner]:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return "asyncio", asyncio.run
    return "uvloop", cast(Runner, uvloop.run)


#: Which loop :func:`run` uses: ``uvloop`` or ``asyncio``.
NAME, _RUN = _runner()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to the end on a new loop of the best kind installed."""
    _RUN(main)
