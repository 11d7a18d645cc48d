"""Request endings, a bounded number per turn of the event loop.

Ending a request costs more than anything else in its life after its start: the end of its
response, its accounting, its log lines and aiohttp's own teardown, several times what a
relayed chunk costs. The chunks of the streams that go on are relayed between turns of the
loop, by the worker sockets' readers. When a thousand streams end within 50 ms, their handlers
all wake within a few turns: a turn that ends hundreds of them holds up every chunk of every
other stream for tens of milliseconds.

So at most :data:`PER_TURN` requests end in one turn; the next ones wait for the following
turns, in order. A stream that ends has its last chunks already (they went out as they came),
so what waits is only its terminating chunk and its bookkeeping; the chunks of the others wait
for one turn's endings at most. Below the bound (always, but for bursts) nothing waits.
"""

from __future__ import annotations

import asyncio
from collections import deque

#: Requests that end in one turn of the event loop before the next ones wait (a millisecond or
#: two of work; ``bench_relay.py --scenarios burst`` measured the bound's effect).
PER_TURN = 16


class Ends:
    """The gate each request passes before it ends: ``await ends.turn()``."""

    def __init__(self, per_turn: int = PER_TURN) -> None:
        self.per_turn = per_turn
        #: Endings admitted in this turn.
        self.admitted = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._turn: asyncio.Handle | None = None

    @property
    def waiting(self) -> int:
        """Endings waiting for a later turn."""
        return len(self._waiting)

    async def turn(self) -> None:
        """Return once this ending may go: at once, unless this turn had its share."""
        if not self.admit():
            await self.wait()

    def admit(self) -> bool:
        """Let this ending through now, unless this turn had its share (or others wait)."""
        if self._waiting or self.admitted >= self.per_turn:
            return False
        self.admitted += 1
        self._next_turn()
        return True

    async def wait(self) -> None:
        """Wait for a later turn's share, behind the endings that came first."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._next_turn()
        await waiter

    def _next_turn(self) -> None:
        if self._turn is None:
            self._turn = asyncio.get_running_loop().call_soon(self._new_turn)

    def _new_turn(self) -> None:
        """A new turn: a new share, first for the endings that wait."""
        self._turn = None
        self.admitted = 0
        waiting = self._waiting
        while waiting and self.admitted < self.per_turn:
            waiter = waiting.popleft()
            if not waiter.done():  # its request was cancelled meanwhile
                waiter.set_result(None)
                self.admitted += 1
        if waiting or self.admitted:
            self._next_turn()
