"""Answers about names, remembered within bounds.

Some questions are asked about the same few names on every request or log line: whether a log
field may hold a credential, whether a response header may reach a client, which names a model
falls back to. Their answers are worth remembering; but the names come from peers and clients,
so the memory is bounded in both directions: past ``entries`` names a name is judged afresh
each time, and a name longer than ``key_length`` is never kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Remembered(Generic[T]):
    """``judge(name)``, remembered for up to ``entries`` names of up to ``key_length``
    characters; :attr:`memo` is what is remembered, for a caller that looks there first."""

    __slots__ = ("entries", "judge", "key_length", "memo")

    def __init__(
        self, judge: Callable[[str], T], *, entries: int = 4096, key_length: int = 256
    ) -> None:
        self.judge = judge
        self.entries = entries
        self.key_length = key_length
        self.memo: dict[str, T] = {}

    def __call__(self, name: str) -> T:
        answer = self.memo.get(name)
        if answer is None:
            answer = self.judge(name)
            if len(name) <= self.key_length and len(self.memo) < self.entries:
                self.memo[name] = answer
        return answer
