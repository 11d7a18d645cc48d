"""The worker registry and least-busy scheduler, as pure bookkeeping with no network."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import pytest

from llamapool.errors import NoWorkerError, RoutingError, WorkerIdInUseError, WorkersBusyError
from llamapool.protocol import ProxyRequest
from llamapool.server import pool as pool_module
from llamapool.server.exchange import Exchange
from llamapool.server.pool import Pool, WorkerHandle, fallback_names

CHAT = "/v1/chat/completions"
OLLAMA_CHAT = "/api/chat"
OPENAI_ONLY = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


class FakeLink:
    """A link that goes nowhere: the pool only stores it."""

    window = 0

    def __init__(self) -> None:
        self.closed_because: list[str] = []

    def open(self) -> Exchange:
        raise AssertionError("the pool never opens requests")

    def forget(self, request_id: str) -> None:
        pass

    async def send_request(self, request: ProxyRequest, body: bytes) -> None:
        pass

    async def cancel(self, request_id: str) -> None:
        pass

    def grant_soon(self, request_id: str, amount: int) -> None:
        pass

    def close_soon(self, reason: str) -> None:
        self.closed_because.append(reason)


def make_worker(
    worker_id: str,
    models: Iterable[str] = ("m",),
    *,
    max_concurrency: int = 4,
    paths: frozenset[str] | None = None,
    name: str = "",
    instance: str = "",
) -> WorkerHandle:
    return WorkerHandle(
        id=worker_id,
        name=name or worker_id,
        models=frozenset(models),
        max_concurrency=max_concurrency,
        paths=paths,
        link=FakeLink(),
        instance=instance,
    )


def pool_of(*workers: WorkerHandle) -> Pool:
    pool = Pool()
    for worker in workers:
        pool.add(worker)
    return pool


def picks(pool: Pool, model: str, path: str, times: int) -> list[str]:
    """Ids of the workers chosen by ``times`` sequential acquire/release pairs."""
    chosen = []
    for _ in range(times):
        worker = pool.acquire(model, path)
        chosen.append(worker.id)
        pool.release(worker)
    return chosen


# --- choosing a worker ----------------------------------------------------------------------


def test_acquire_picks_the_least_busy_worker() -> None:
    """acquire takes the worker with the fewest requests in flight."""
    a, b, c = make_worker("a"), make_worker("b"), make_worker("c")
    pool = pool_of(a, b, c)
    for _ in range(3):
        pool.acquire("m", CHAT)  # one each
    pool.acquire("m", CHAT)
    pool.acquire("m", CHAT)  # two workers at 2, one at 1
    idle = next(w for w in (a, b, c) if w.inflight == 1)

    assert idle is pool.acquire("m", CHAT)
    pool.release(a)
    assert a is pool.acquire("m", CHAT)


def test_acquire_counts_inflight_and_release_gives_it_back() -> None:
    """Each acquire adds one request in flight to the chosen worker; release removes it."""
    worker = make_worker("a")
    pool = pool_of(worker)

    pool.acquire("m", CHAT)
    pool.acquire("m", CHAT)
    assert 2 == worker.inflight
    pool.release(worker)
    pool.release(worker)
    pool.release(worker)  # one release too many never goes below zero
    assert 0 == worker.inflight


def test_ties_rotate_round_robin() -> None:
    """Among equally busy workers, sequential requests go to each in turn."""
    pool = pool_of(make_worker("a"), make_worker("b"), make_worker("c"))

    assert ["a", "b", "c", "a", "b", "c", "a"] == picks(pool, "m", CHAT, 7)


def test_ties_rotate_across_workers_with_different_paths() -> None:
    """Idle workers that serve different path sets (a Go worker, a py worker) share the load."""
    go_worker = make_worker("go", paths=None)
    py_worker = make_worker("py", paths=OPENAI_ONLY)
    pool = pool_of(go_worker, py_worker)

    assert {"go", "py"} == set(picks(pool, "m", CHAT, 4))


def test_a_worker_never_exceeds_its_max_concurrency() -> None:
    """Once every worker is full, acquire fails with WorkersBusyError (HTTP 503)."""
    a = make_worker("a", max_concurrency=2)
    b = make_worker("b", max_concurrency=1)
    pool = pool_of(a, b)
    for _ in range(3):
        pool.acquire("m", CHAT)

    with pytest.raises(WorkersBusyError) as caught:
        pool.acquire("m", CHAT)
    assert (2, 1) == (a.inflight, b.inflight)
    assert 503 == caught.value.status


def test_a_released_slot_can_be_taken_again() -> None:
    """After a full worker releases a slot, the next acquire gets that worker again."""
    worker = make_worker("a", max_concurrency=1)
    pool = pool_of(worker)
    pool.acquire("m", CHAT)
    with pytest.raises(WorkersBusyError):
        pool.acquire("m", CHAT)

    pool.release(worker)

    assert worker is pool.acquire("m", CHAT)


def test_unknown_model_raises_no_worker_error() -> None:
    """A model no worker serves fails with NoWorkerError (HTTP 404), also in an empty pool."""
    with pytest.raises(NoWorkerError) as empty:
        Pool().acquire("m", CHAT)
    with pytest.raises(NoWorkerError) as unknown:
        pool_of(make_worker("a")).acquire("other", CHAT)

    assert (404, 404) == (empty.value.status, unknown.value.status)
    assert isinstance(unknown.value, RoutingError)


# --- model names and aliases ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("llama3:8b-q4_0", ["llama3:8b-q4_0", "llama3:8b"]),
        ("llama3:8b-instruct-q8_0", ["llama3:8b-instruct-q8_0", "llama3:8b"]),
        ("llama3", ["llama3", "llama3:latest"]),
        ("llama3:latest", ["llama3:latest", "llama3"]),
        ("llama3:8b", ["llama3:8b"]),
        (
            "meta-llama/Llama-3.1-8B-Instruct",
            ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct:latest"],
        ),
    ],
)
def test_fallback_names_follow_the_go_alias_rule(requested: str, expected: list[str]) -> None:
    """The exact name comes first, then Go's name:tag alias, then Ollama's implicit :latest
    (the same when asked again, from memory)."""
    assert [expected, expected] == [list(fallback_names(requested)) for _ in range(2)]


def test_fallbacks_are_remembered_within_bounds() -> None:
    """Model names come from clients: ever new or huge names fill no more than the bound,
    never with a huge name, and every name is still answered right once the memory is full."""
    huge = "m" * 100_000 + ":latest"
    for i in range(fallback_names.entries + 100):
        fallback_names(f"model-{i}")
        fallback_names(huge)

    assert len(fallback_names.memo) <= fallback_names.entries
    assert [] == [name for name in fallback_names.memo if len(name) > fallback_names.key_length]
    assert ("new:8b-q4_0", "new:8b") == fallback_names("new:8b-q4_0")
    assert (huge, huge.removesuffix(":latest")) == fallback_names(huge)


def test_a_quantization_suffix_falls_back_to_name_and_tag() -> None:
    """llama3:8b-q4_0 is served by a worker that has llama3:8b."""
    worker = make_worker("a", ["llama3:8b"])
    pool = pool_of(worker)

    assert worker is pool.acquire("llama3:8b-q4_0", CHAT)


def test_latest_tag_is_implicit_both_ways() -> None:
    """llama3 is served by a worker with llama3:latest, and llama3:latest by one with llama3."""
    tagged = make_worker("tagged", ["llama3:latest"])
    bare = make_worker("bare", ["qwen2"])
    pool = pool_of(tagged, bare)

    assert tagged is pool.acquire("llama3", CHAT)
    assert bare is pool.acquire("qwen2:latest", CHAT)


def test_an_exact_match_wins_over_an_alias_even_when_busier() -> None:
    """A worker with the exact model is chosen over a less busy one serving only its alias."""
    exact = make_worker("exact", ["llama3:8b-q4_0"], max_concurrency=10)
    alias = make_worker("alias", ["llama3:8b"], max_concurrency=10)
    pool = pool_of(exact, alias)

    chosen = [pool.acquire("llama3:8b-q4_0", CHAT) for _ in range(5)]

    assert [exact] * 5 == chosen
    assert 0 == alias.inflight


def test_a_model_with_a_dash_in_its_tag_needs_the_exact_name() -> None:
    """The alias only drops a suffix: llama3:8b does not match a worker with llama3:8b-q4_0."""
    pool = pool_of(make_worker("a", ["llama3:8b-q4_0"]))

    with pytest.raises(NoWorkerError):
        pool.acquire("llama3:8b", CHAT)


# --- API paths ------------------------------------------------------------------------------


def test_a_worker_is_never_picked_for_a_path_it_cannot_serve() -> None:
    """A worker without /api/chat never gets it, even when it is the least busy one."""
    openai_only = make_worker("vllm", paths=OPENAI_ONLY)
    everything = make_worker("go", paths=None)
    pool = pool_of(openai_only, everything)

    chosen = [pool.acquire("m", OLLAMA_CHAT) for _ in range(4)]

    assert [everything] * 4 == chosen
    assert 0 == openai_only.inflight
    assert openai_only is pool.acquire("m", CHAT)  # but it does take the paths it serves


def test_a_path_no_worker_serves_raises_no_worker_error() -> None:
    """A model whose only workers cannot serve the path is not found (404), not busy."""
    pool = pool_of(make_worker("vllm", paths=OPENAI_ONLY))

    with pytest.raises(NoWorkerError):
        pool.acquire("m", OLLAMA_CHAT)


def test_workers_with_no_paths_serve_every_path() -> None:
    """paths=None (a Go worker) means the worker serves any path."""
    worker = make_worker("go", paths=None)
    pool = pool_of(worker)

    for path in (CHAT, OLLAMA_CHAT, "/api/generate", "/v1/embeddings"):
        assert worker is pool.acquire("m", path)


# --- joining and leaving --------------------------------------------------------------------


def test_models_follow_workers_joining_and_leaving() -> None:
    """The pool's models are the union of its workers' models, updated as they come and go."""
    a = make_worker("a", ["llama3:8b", "qwen2:7b"])
    b = make_worker("b", ["qwen2:7b", "phi3"])
    pool = pool_of(a)
    assert ["llama3:8b", "qwen2:7b"] == [m.id for m in pool.models()]

    pool.add(b)
    assert ["llama3:8b", "phi3", "qwen2:7b"] == [m.id for m in pool.models()]
    assert ("a", "b") == tuple(w.id for w in pool.models()[2].workers)

    assert pool.remove(a)
    assert ["phi3", "qwen2:7b"] == [m.id for m in pool.models()]
    with pytest.raises(NoWorkerError):
        pool.acquire("llama3:8b", CHAT)
    assert b is pool.acquire("qwen2:7b", CHAT)


def test_removing_a_worker_twice_is_harmless() -> None:
    """remove answers False for a worker that is already gone."""
    worker = make_worker("a")
    pool = pool_of(worker)

    assert (True, False) == (pool.remove(worker), pool.remove(worker))
    assert 0 == len(pool)


def test_readding_an_id_replaces_the_old_handle() -> None:
    """add with a connected id and the same instance secret (the same worker process on a new
    link) returns the old handle, which no longer takes requests."""
    old = make_worker("a", ["old-model"], instance="s3cret")
    new = make_worker("a", ["new-model"], instance="s3cret")
    pool = pool_of(old)

    replaced = pool.add(new)

    assert old is replaced
    assert new is pool.get("a")
    assert [new] == list(pool)
    assert ["new-model"] == [m.id for m in pool.models()]
    with pytest.raises(NoWorkerError):
        pool.acquire("old-model", CHAT)


def test_the_replaced_handle_leaving_does_not_remove_its_successor() -> None:
    """When the replaced connection finally closes, removing its handle keeps the new one."""
    old, new = make_worker("a", instance="s3cret"), make_worker("a", instance="s3cret")
    pool = pool_of(old)
    pool.add(new)

    assert not pool.remove(old)
    assert new is pool.acquire("m", CHAT)


@pytest.mark.parametrize(
    ("connected", "newcomer"),
    [("s3cret", "other"), ("s3cret", ""), ("", ""), ("", "s3cret")],
)
def test_a_connected_id_is_not_taken_without_its_instance_secret(
    connected: str, newcomer: str
) -> None:
    """Another worker with the same id (anyone holding the worker key, or a second process
    given the same WORKER_ID) is refused while the first is connected; the first keeps
    serving."""
    first = make_worker("a", ["m"], instance=connected)
    pool = pool_of(first)

    with pytest.raises(WorkerIdInUseError):
        pool.add(make_worker("a", ["hijacked"], instance=newcomer))

    assert ([first], first) == (list(pool), pool.acquire("m", CHAT))


def test_set_models_replaces_what_a_worker_serves() -> None:
    """After set_models the worker takes requests for its new models only."""
    worker = make_worker("a", ["llama3:8b"])
    pool = pool_of(worker)

    pool.set_models(worker, ["qwen2:7b", "phi3"])

    assert ["phi3", "qwen2:7b"] == [m.id for m in pool.models()]
    assert worker is pool.acquire("phi3", CHAT)
    with pytest.raises(NoWorkerError):
        pool.acquire("llama3:8b", CHAT)


def test_set_models_keeps_the_requests_in_flight() -> None:
    """A models update while busy keeps the worker's load and its max concurrency."""
    worker = make_worker("a", ["llama3:8b"], max_concurrency=1)
    pool = pool_of(worker)
    pool.acquire("llama3:8b", CHAT)

    pool.set_models(worker, ["llama3:8b", "phi3"])

    with pytest.raises(WorkersBusyError):
        pool.acquire("phi3", CHAT)
    pool.release(worker)
    assert worker is pool.acquire("phi3", CHAT)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_models_created_is_the_time_a_model_was_first_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model's created time stays when more workers bring it, when they leave, and later."""
    clock = Clock(1_000.0)
    monkeypatch.setattr(pool_module, "time", clock)
    first = make_worker("first", ["llama3:8b"])
    pool = pool_of(first)

    clock.now = 2_000.0
    second = make_worker("second", ["llama3:8b", "phi3"])
    pool.add(second)
    pool.remove(first)
    clock.now = 3_000.0
    pool.set_models(second, ["llama3:8b", "phi3", "qwen2"])

    assert {"llama3:8b": 1_000, "phi3": 2_000, "qwen2": 3_000} == {
        m.id: m.created for m in pool.models()
    }


# --- cost per request -----------------------------------------------------------------------


def count_pool_lines(action: Callable[[], Any]) -> int:
    """How many lines of llamapool/server/pool.py run during ``action``."""
    pool_file = pool_module.__file__
    lines = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == pool_file else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        action()
    finally:
        sys.settrace(previous)
    return lines


def idle_pool(size: int) -> Pool:
    return pool_of(*(make_worker(f"w{i}") for i in range(size)))


def test_acquire_and_release_run_the_same_code_for_10_or_5000_workers() -> None:
    """The scheduler's work per request does not grow with the number of workers."""
    small, large = idle_pool(10), idle_pool(5000)

    small_lines = count_pool_lines(lambda: picks(small, "m", CHAT, 2000))
    large_lines = count_pool_lines(lambda: picks(large, "m", CHAT, 2000))

    assert small_lines == large_lines
    assert 0 == sum(w.inflight for w in large)


def test_acquire_touches_only_the_chosen_worker() -> None:
    """Taking a slot on a pool of 5000 idle workers changes the load of one worker only."""
    pool = idle_pool(5000)

    chosen = pool.acquire("m", CHAT)

    assert [chosen] == [w for w in pool if w.inflight]
    assert 1 == chosen.inflight


def best_time(action: Callable[[], Any], *, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def test_round_robin_does_not_slow_down_with_many_workers() -> None:
    """Rotating through 30000 idle workers costs about what rotating through 10 does.

    Line counts can not see C-level work such as scanning a dict's deleted entries, so this one
    check compares times, with a bound several times wider than the noise.
    """
    small, large = idle_pool(10), idle_pool(30_000)

    small_time = best_time(lambda: picks(small, "m", CHAT, 60_000))
    large_time = best_time(lambda: picks(large, "m", CHAT, 60_000))

    assert large_time < 4 * small_time, (small_time, large_time)
