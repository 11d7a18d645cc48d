"""Response affinity: the OpenAI Responses API's stored responses live on one worker.

A backend that serves ``/v1/responses`` keeps each response it produced (vLLM, llama.cpp and
OpenAI itself do), so a follow-up naming it in ``previous_response_id``, and ``GET`` or
``DELETE /v1/responses/{id}``, must reach the worker whose backend holds it. The pool learns
which one that is from the answer itself: :class:`ResponseIdScanner` reads the id from the
relayed bytes (never rewriting or buffering them) and :class:`ResponseAffinity` remembers it.

Memory is bounded in both time and count: an id is forgotten :data:`TTL` seconds after it was
last used, and beyond :data:`MAX_IDS` ids the least recently used go first. Each entry costs a
few hundred bytes, so the default bound is a few tens of megabytes at most.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import attrs

#: Seconds an id is remembered after it was produced or last followed up.
TTL = 3600.0
#: How many ids are remembered at most; the least recently used are forgotten first.
MAX_IDS = 100_000

#: The public path of the Responses API and the prefix of its stored responses.
RESPONSES_PATH = "/v1/responses"


@attrs.frozen
class Holder:
    """Where a stored response lives: the worker (by id) and the model it was made with."""

    worker_id: str
    model: str


class ResponseAffinity:
    """Response id -> the worker that holds it, bounded by age and count (LRU).

    Entries are kept in least-recently-used order with the time of their last use; since every
    entry lives for the same :attr:`ttl`, the oldest entry is always first, and pruning pops
    from the front: remembering and looking up cost O(1) (amortized).
    """

    __slots__ = ("_clock", "_ids", "lookup", "max_ids", "on_remember", "ttl")

    def __init__(
        self,
        *,
        ttl: float = TTL,
        max_ids: int = MAX_IDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_ids = max_ids
        self._clock = clock
        self._ids: OrderedDict[str, tuple[Holder, float]] = OrderedDict()
        #: In a cluster: told of every id remembered here, and asked of ids this server does
        #: not know, so a follow-up may reach any server (the cluster sets them).
        self.on_remember: Callable[[str, Holder], None] | None = None
        self.lookup: Callable[[str], Awaitable[Holder | None]] | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def remember(self, response_id: str, holder: Holder, *, share: bool = True) -> None:
        """``holder`` produced ``response_id`` (``share=False``: the cluster said so)."""
        if share and self.on_remember is not None:
            self.on_remember(response_id, holder)
        now = self._clock()
        self._ids[response_id] = (holder, now)
        self._ids.move_to_end(response_id)
        self._prune(now)

    def holder(self, response_id: str) -> Holder | None:
        """Who holds ``response_id``, or ``None`` when the pool does not know (or forgot)."""
        now = self._clock()
        self._prune(now)
        entry = self._ids.get(response_id)
        if entry is None:
            return None
        self._ids[response_id] = (entry[0], now)
        self._ids.move_to_end(response_id)
        return entry[0]

    def forget(self, response_id: str) -> None:
        """The response was deleted."""
        self._ids.pop(response_id, None)

    def _prune(self, now: float) -> None:
        ids = self._ids
        while len(ids) > self.max_ids:
            ids.popitem(last=False)
        horizon = now - self.ttl
        while ids:
            first = next(iter(ids.values()))
            if first[1] > horizon:
                break
            ids.popitem(last=False)


#: A JSON ``"id": "..."`` key and string value (a key's quotes are never escaped, so text the
#: model wrote, inside a string, does not match).
_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:\-]{1,200})"')
_MARKER = re.compile(rb'"id"')
#: Longer than any ``"id": "value"`` we accept, so an id split across chunks is found.
_OVERLAP = 256
#: How far into a response the id is looked for. The response object's ``id`` is its first
#: field, and ``response.created`` is a stream's first event: both come long before this.
SCAN_LIMIT = 64 * 1024


class ResponseIdScanner:
    """Finds the id of a Responses API answer in its first bytes, as they stream past.

    The first ``"id"`` of the answer is the response's: a non-streamed body is the response
    object, whose ``id`` comes first (OpenAI, vLLM, llama.cpp), and a stream opens with the
    ``response.created`` event, whose ``response`` object comes before any output item. Past
    :data:`SCAN_LIMIT` bytes, or once found, :meth:`feed` does nothing.
    """

    __slots__ = ("_seen", "_tail", "response_id")

    def __init__(self) -> None:
        self.response_id = ""
        self._tail = b""
        self._seen = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        if self.response_id or self._seen >= SCAN_LIMIT:
            return
        self._seen += len(chunk)
        seam = self._tail + bytes(chunk[:_OVERLAP])
        # The seam first: it holds the bytes that come before the rest of the chunk.
        for data in (seam, chunk):
            if _MARKER.search(data):
                found = _ID.search(data)
                if found is not None:
                    self.response_id = found.group(1).decode()
                    return
        self._tail = seam[-_OVERLAP:] if len(chunk) <= _OVERLAP else bytes(chunk[-_OVERLAP:])
