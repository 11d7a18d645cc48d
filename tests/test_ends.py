"""Request endings pass a gate that lets a bounded number through per turn of the event loop,
so a burst of endings cannot hold up the chunks of the streams that go on (``server/ends.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llamapool.server.ends import Ends


class TurnCounter:
    """Counts turns of the event loop: a callback that schedules itself runs once per turn."""

    def __init__(self) -> None:
        self.turn = 0
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.turn += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def end(ends: Ends, name: str, passed: list[tuple[int, str]], turns: TurnCounter) -> None:
    """What a request does before it ends."""
    await ends.turn()
    passed.append((turns.turn, name))


async def ending_together(
    ends: Ends, count: int, before: Callable[[list[asyncio.Task[None]]], None] = lambda _: None
) -> list[tuple[int, str]]:
    """``count`` requests that reach their end in the same turn; (turn, name) as each passes."""
    turns, passed = TurnCounter(), []
    tasks = [asyncio.ensure_future(end(ends, f"r{i}", passed, turns)) for i in range(count)]
    before(tasks)
    await asyncio.gather(*tasks, return_exceptions=True)
    turns.stop()
    return passed


async def test_a_burst_of_endings_passes_a_share_per_turn_in_the_order_it_came() -> None:
    passed = await ending_together(Ends(per_turn=3), 10)

    per_turn: dict[int, int] = {}
    for turn, _ in passed:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert [f"r{i}" for i in range(10)] == [name for _, name in passed]
    assert 3 == max(per_turn.values())
    assert 4 <= len(per_turn)  # 10 endings, 3 a turn


async def test_endings_below_the_share_never_wait() -> None:
    ends = Ends(per_turn=16)

    passed = await ending_together(ends, 16)

    assert 1 == len({turn for turn, _ in passed})
    assert 0 == ends.waiting


async def test_an_ending_cancelled_while_it_waits_gives_its_place_to_the_next() -> None:
    ends = Ends(per_turn=1)

    def cancel_the_second_once_it_waits(tasks: list[asyncio.Task[None]]) -> None:
        asyncio.get_running_loop().call_soon(tasks[1].cancel)  # after their first steps

    passed = await ending_together(ends, 3, before=cancel_the_second_once_it_waits)

    assert ["r0", "r2"] == [name for _, name in passed]
    assert 0 == ends.waiting
