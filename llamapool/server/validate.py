"""Checks on what workers send before it reaches routing, the state API, metrics or the page.

Workers hold a key, but a buggy or hostile one must not be able to flood label values, smuggle
markup or control characters into the dashboard, or grow the server's memory without bound.
"""

from __future__ import annotations

import re

import attrs

from llamapool.protocol import Register

MAX_REGISTER_BYTES = 256 * 1024
MAX_ID = 128
MAX_NAME = 128
MAX_MODEL = 256
MAX_SHORT = 64
MAX_PATHS = 64
MAX_CONCURRENCY = 4096
#: Printable text without control characters (names, versions).
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")
#: Model ids and paths: printable and no whitespace (``org/model:tag-q4_0`` and the like).
_TOKEN = re.compile(r"^[^\x00-\x20\x7f]+$")
#: Worker ids end up in metric labels: keep them plain.
_ID = re.compile(r"^[\w.:@+=/-]+$")


class Invalid(ValueError):
    """What the worker sent cannot be accepted; the message says what (it is sent back)."""


def check_register(register: Register, *, max_models: int) -> Register:
    """``register`` with its strings checked; raises :class:`Invalid` naming the problem."""
    if register.worker_id:
        check_id("worker_id", register.worker_id)
    for field, limit in (
        ("worker_name", MAX_NAME),
        ("version", MAX_SHORT),
        ("build_sha", MAX_SHORT),
        ("build_date", MAX_SHORT),
        ("backend", MAX_SHORT),
        ("instance", MAX_SHORT),
    ):
        check_text(field, getattr(register, field), limit)
    if not 0 <= register.max_concurrency <= MAX_CONCURRENCY:
        raise Invalid(f"max_concurrency must be at most {MAX_CONCURRENCY}")
    if len(register.paths) > MAX_PATHS or not all(_is_path(p) for p in register.paths):
        raise Invalid(f"paths must be at most {MAX_PATHS} absolute API paths")
    return attrs.evolve(register, models=check_models(register.models, max_models=max_models))


def check_id(field: str, worker_id: str) -> None:
    """Worker ids become metric labels: plain characters only (workers check their own at
    start, so a bad one is a setting's error there, not a refusal here forever)."""
    if len(worker_id) > MAX_ID or not _ID.match(worker_id):
        raise Invalid(f"{field} must be at most {MAX_ID} letters, digits or ._:@+=/-")


def check_text(field: str, value: str, limit: int = MAX_NAME) -> None:
    """Names and versions: printable, bounded."""
    if len(value) > limit or not _PRINTABLE.match(value):
        raise Invalid(f"{field} must be printable text of at most {limit} characters")


def valid_model(model: str) -> bool:
    """Whether ``model`` may be advertised (a worker drops the ids that may not)."""
    return len(model) <= MAX_MODEL and bool(_TOKEN.match(model))


def check_models(models: list[str], *, max_models: int) -> list[str]:
    """Model ids, deduplicated; raises :class:`Invalid` for too many or a malformed one."""
    unique = list(dict.fromkeys(models))
    if len(unique) > max_models:
        raise Invalid(f"too many models: {len(unique)} (at most {max_models})")
    for model in unique:
        if not valid_model(model):
            raise Invalid(f"model ids must be at most {MAX_MODEL} printable, spaceless characters")
    return unique


def _is_path(path: str) -> bool:
    return path.startswith("/") and len(path) <= MAX_MODEL and bool(_TOKEN.match(path))


#: Response headers from a worker: how many and how large.
MAX_HEADERS = 64
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8 * 1024
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an RFC 9110 token


def check_headers(headers: dict[str, str]) -> dict[str, str]:
    """The worker's response headers that are well-formed, within the limits; the rest drop."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        if len(kept) >= MAX_HEADERS:
            break
        if (
            len(name) <= MAX_HEADER_NAME
            and _HEADER_NAME.match(name)
            and len(value) <= MAX_HEADER_VALUE
            and "\r" not in value
            and "\n" not in value
            and "\x00" not in value
        ):
            kept[name] = value
    return kept
