"""The requests a worker is serving: each one replayed against the backend in its own task.

A job streams the backend's answer back as it comes. With flow control, it sends no more than
the server has granted, so a slow client slows its own backend read (through TCP) instead of
filling the server's memory. Cancelling the task closes the backend connection, so the
backend stops generating.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp
import attrs
import orjson
import structlog

from llamapool.config import MIB
from llamapool.errors import BackendError
from llamapool.headers import CLIENT_ONLY, RECOMPUTED, forwardable
from llamapool.plugin_api import Backend
from llamapool.protocol import (
    Message,
    ProxyRequest,
    ResponseEnd,
    ResponseHeaders,
    WireError,
    with_model,
)
from llamapool.urls import without_credentials
from llamapool.worker import translate
from llamapool.worker.metrics import WorkerMetrics

log = structlog.get_logger("llamapool.worker")

#: Request headers the worker never passes on: the client's side of the server, plus
#: Accept-Encoding, because the worker asks its backend for identity-encoded bytes.
_NOT_TO_BACKEND = CLIENT_ONLY | {"accept-encoding"}
#: ... and when the worker translates, the headers that describe the client's own body.
_NOT_TRANSLATED = _NOT_TO_BACKEND | {"content-type", "accept"}
#: The largest whole (not streamed) answer the worker reads from its backend to translate: it
#: holds the answer and its translation at once. The server's default ``MAX_BODY_SIZE``, ample
#: for a batch of embeddings; past it the client gets a 502 saying so.
MAX_TRANSLATED_ANSWER = 16 * MIB
#: Of an error answer the worker reads this much: its message is near the start.
_ERROR_READ = 64 * 1024


class Outbox(Protocol):
    """Where a job's messages go: the current server connection."""

    async def send(self, message: Message) -> None: ...

    async def send_chunk(self, request_id: str, chunk: bytes) -> None: ...


@attrs.define(eq=False)
class Job:
    """One request in progress and its send credit (``window`` 0: unlimited)."""

    request: ProxyRequest
    credit: int
    started: float = attrs.field(factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    _more: asyncio.Event = attrs.field(factory=asyncio.Event)

    def grant(self, amount: int) -> None:
        self.credit += amount
        self._more.set()

    async def send(self, outbox: Outbox, chunk: bytes) -> None:
        """Send ``chunk``, never past the credit: what does not fit waits for more.

        One backend read can be far bigger than the credit left (a fast backend fills the
        reader's buffer, hundreds of KiB, while the job waits), so a chunk that does not fit
        leaves in parts; the server then holds at most the window for a client that stalls.
        """
        rid = self.request.request_id
        if not self.request.window:
            await outbox.send_chunk(rid, chunk)
            return
        while chunk:
            while self.credit <= 0:
                self._more.clear()
                await self._more.wait()
            part, chunk = chunk[: self.credit], chunk[self.credit :]
            self.credit -= len(part)
            await outbox.send_chunk(rid, part)


class Jobs:
    """Every request the worker is serving, and the counters of those it served."""

    def __init__(
        self,
        backend: Backend,
        http: Callable[[], aiohttp.ClientSession],
        metrics: WorkerMetrics,
    ) -> None:
        self.backend = backend
        #: The Ollama paths the worker translates for this backend (see ``translate``).
        self._translatable = translate.translatable(backend.paths)
        self.translated = self._translatable - backend.paths
        #: Every public path the worker serves: the backend's own and the translated ones.
        self.paths = backend.paths | self.translated
        self._http = http
        self.metrics = metrics
        self.running: dict[str, Job] = {}
        self.last_error = ""
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self.running)

    def start(self, request: ProxyRequest, body: bytes, outbox: Outbox) -> None:
        job = Job(request, credit=request.window)
        job.task = asyncio.create_task(self._run(job, body, outbox))
        self.running[request.request_id] = job
        self._idle.clear()
        self.metrics.jobs_started.inc()
        self.metrics.current_jobs.set(len(self.running))

    def cancel(self, request_id: str) -> None:
        job = self.running.get(request_id)
        if job is not None and job.task is not None:
            job.task.cancel()

    def grant(self, request_id: str, amount: int) -> None:
        job = self.running.get(request_id)
        if job is not None:
            job.grant(amount)

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self.running.values() if j.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no job runs; ``False`` if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _run(self, job: Job, body: bytes, outbox: Outbox) -> None:
        request = job.request
        outcome = "failed"
        try:
            outcome = await self._relay(job, body, outbox)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.running.pop(request.request_id, None)
            m = self.metrics
            m.current_jobs.set(len(self.running))
            m.job_duration.observe(time.monotonic() - job.started)
            {"succeeded": m.jobs_succeeded, "failed": m.jobs_failed}.get(
                outcome, m.jobs_cancelled
            ).inc()
            if not self.running:
                self._idle.set()

    async def _relay(self, job: Job, body: bytes, outbox: Outbox) -> str:
        """Replay one request against the backend; returns how it went."""
        request, rid = job.request, job.request.request_id
        if self._translates(request, body):
            return await self._translate(job, body, outbox)
        if not _serves(self.backend.paths, request.path):
            return await self._fail(outbox, rid, "unsupported_path", f"cannot serve {request.path}")
        headers = self._headers(request, _NOT_TO_BACKEND)
        if request.model and body:
            body = with_model(body, request.model)
        try:
            url = self.backend.upstream_url(request.path)
            async with self._http().request(request.method, url, data=body, headers=headers) as r:
                status = r.status
                await outbox.send(
                    ResponseHeaders(rid, status, forwardable(r.headers.items(), RECOMPUTED))
                )
                async for chunk in r.content.iter_any():
                    await job.send(outbox, chunk)
        except (aiohttp.ClientError, TimeoutError, BackendError) as exc:
            message = without_credentials(str(exc) or type(exc).__name__)
            log.warning("backend_request_failed", path=request.path, error=message)
            return await self._fail(outbox, rid, "backend_error", message)
        except Exception as exc:  # never leave the server waiting on a request
            log.exception("backend_request_crashed", path=request.path)
            return await self._fail(outbox, rid, "worker_error", f"{type(exc).__name__}: {exc}")
        await outbox.send(ResponseEnd(rid))
        return "failed" if status >= 500 else "succeeded"

    def _headers(self, request: ProxyRequest, drop: frozenset[str]) -> dict[str, str]:
        headers = forwardable(request.headers.items(), drop)
        headers.update(self.backend.auth_headers())
        headers["Accept-Encoding"] = "identity"
        return headers

    def _translates(self, request: ProxyRequest, body: bytes) -> bool:
        """Whether to translate this request: an Ollama path the backend lacks, or serves
        itself only for other models (``Backend.native_models``)."""
        path = request.path
        if path in self.translated:
            return True
        if path not in self._translatable:
            return False
        models = self.backend.native_models(path)
        return models is not None and (request.model or _model_of(body)) not in models

    async def _translate(self, job: Job, body: bytes, outbox: Outbox) -> str:
        """Serve an Ollama request from the backend's OpenAI API, translating both ways."""
        request, rid = job.request, job.request.request_id
        try:
            plan = translate.plan(
                request.path, body, served=self.backend.paths, model=request.model
            )
        except translate.TranslationError as exc:
            log.info("translation_refused", path=request.path, reason=str(exc))
            return await self._answer(outbox, rid, 400, translate.error_body(str(exc)))
        reply = translate.Reply(plan)
        if plan.local is not None:
            return await self._answer(outbox, rid, 200, reply.local(), reply.content_type)
        headers = self._headers(request, _NOT_TRANSLATED)
        headers["Content-Type"] = "application/json"
        try:
            url = self.backend.upstream_url(plan.upstream)
            async with self._http().post(url, data=plan.body, headers=headers) as r:
                status = r.status
                if status >= 400:
                    head = (await _read_up_to(r, _ERROR_READ))[:_ERROR_READ]
                    message = translate.error_message(status, head)
                    return await self._answer(outbox, rid, status, translate.error_body(message))
                if not (plan.stream and r.content_type == "text/event-stream"):
                    body = await _read_up_to(r, MAX_TRANSLATED_ANSWER)
                    if len(body) > MAX_TRANSLATED_ANSWER:
                        return await self._too_large(outbox, rid, plan.upstream)
                    answer = reply.whole(body)
                    return await self._answer(outbox, rid, status, answer, reply.content_type)
                await outbox.send(ResponseHeaders(rid, status, {"Content-Type": translate.NDJSON}))
                async for chunk in r.content.iter_any():
                    lines = reply.feed(chunk)
                    if lines:
                        await job.send(outbox, lines)
                lines = reply.finish()
                if lines:
                    await job.send(outbox, lines)
        except (aiohttp.ClientError, TimeoutError, BackendError, translate.BadAnswer) as exc:
            message = without_credentials(str(exc) or type(exc).__name__)
            log.warning("backend_request_failed", path=plan.upstream, error=message)
            return await self._fail(outbox, rid, "backend_error", message)
        except Exception as exc:  # never leave the server waiting on a request
            log.exception("backend_request_crashed", path=plan.upstream)
            return await self._fail(outbox, rid, "worker_error", f"{type(exc).__name__}: {exc}")
        await outbox.send(ResponseEnd(rid))
        return "succeeded"

    async def _too_large(self, outbox: Outbox, request_id: str, upstream: str) -> str:
        """Refuse a whole answer past :data:`MAX_TRANSLATED_ANSWER`, in Ollama's shape."""
        limit = MAX_TRANSLATED_ANSWER // MIB
        log.warning("backend_answer_too_large", path=upstream, limit_mib=limit)
        message = f"the backend's answer is larger than the {limit} MiB the worker translates"
        self.last_error = message
        return await self._answer(outbox, request_id, 502, translate.error_body(message))

    async def _answer(
        self,
        outbox: Outbox,
        request_id: str,
        status: int,
        body: bytes,
        content_type: str = translate.JSON,
    ) -> str:
        """Send a whole answer the worker made itself."""
        await outbox.send(ResponseHeaders(request_id, status, {"Content-Type": content_type}))
        await outbox.send_chunk(request_id, body)
        await outbox.send(ResponseEnd(request_id))
        return "failed" if status >= 500 else "succeeded"

    async def _fail(self, outbox: Outbox, request_id: str, code: str, message: str) -> str:
        self.last_error = message
        await outbox.send(ResponseEnd(request_id, WireError(code=code, message=message)))
        return "failed"


def _serves(paths: frozenset[str], path: str) -> bool:
    """Whether a backend serving ``paths`` serves ``path``: one of them, or a stored response
    of the Responses API it serves (``/v1/responses/{id}...``, query string and all)."""
    return path in paths or (path.startswith("/v1/responses/") and "/v1/responses" in paths)


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of ``response``, or once it passed ``limit`` bytes, what was read by then
    (longer than ``limit``, by less than one read)."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body)


def _model_of(body: bytes) -> str:
    """The ``model`` a JSON request body names, or ``""``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""
