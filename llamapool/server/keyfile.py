"""Named keys: what one client key (``KEYS_FILE``) or worker key (``WORKER_KEYS_FILE``) may
do, and reading them from their file (one layout for both).

No aiohttp here. A key is stored by the SHA-256 of its value, so a file may hold the hash
(``key_sha256``) instead of the secret, and checking a presented key costs one hash and one
dictionary lookup however many keys there are (see :meth:`KeyRing.lookup`).
"""

from __future__ import annotations

import datetime
import difflib
import fnmatch
import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import yaml

from llamapool.errors import ConfigError

#: The name of every key from ``API_KEY``/``API_KEY_FILE``, and of requests to an open pool.
ANONYMOUS = "anonymous"
#: Upper bound of the limits (``rpm``, ``tpm``, ``daily_tokens``, ...): past it a value is a
#: typo, and would not fit the 64-bit integers of metrics and JSON.
MAX_COUNT = 10**12
MIN_WEIGHT, MAX_WEIGHT = 0.001, 1000
MAX_PRIORITY = 10**6
_NAME = re.compile(r"^[A-Za-z0-9][\w.@:+-]{0,63}$")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def digest(key: str) -> bytes:
    """The SHA-256 of a key as sent (a header that is not UTF-8 arrives surrogate-escaped)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@attrs.frozen
class ClientKey:
    """One client key and what it may do; ``None`` limits are no limit."""

    name: str
    sha256: bytes = attrs.field(repr=False)
    #: Glob patterns (``fnmatch``, case-sensitive) of the model names it may use; empty: all.
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    #: Its share of a busy model's workers, relative to the other keys waiting.
    weight: float = 1.0
    #: The priority of its requests within its own share (higher first).
    priority: int = 0
    #: Unix time from which it is refused.
    expires: float | None = None
    disabled: bool = False

    def allows(self, model: str) -> bool:
        """Whether this key may use (and see) ``model``."""
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires

    @property
    def limited(self) -> bool:
        """Whether any rate, token or concurrency limit applies (its answers carry headers)."""
        return any(
            v is not None for v in (self.rpm, self.tpm, self.max_concurrent, self.daily_tokens)
        )


#: What a request to a pool without keys is attributed to.
OPEN = ClientKey(ANONYMOUS, b"")


@attrs.frozen
class Caller:
    """Who sent one request, as the scheduler sees it: the key and the request's priority."""

    key: ClientKey
    priority: int

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def weight(self) -> float:
        return self.key.weight


@attrs.frozen
class KeyRing:
    """Every accepted key, by the SHA-256 of its value."""

    by_sha256: dict[bytes, ClientKey]
    #: The configured names (``anonymous`` included when ``API_KEY`` keys exist).
    names: frozenset[str]

    @classmethod
    def build(cls, plain: tuple[str, ...], named: tuple[ClientKey, ...]) -> KeyRing:
        """``plain`` keys (``API_KEY``) become anonymous keys without limits."""
        by_sha256 = {digest(k): ClientKey(ANONYMOUS, digest(k)) for k in plain}
        for key in named:
            by_sha256.setdefault(key.sha256, key)
        names = frozenset(k.name for k in by_sha256.values())
        return cls(by_sha256, names)

    def lookup(self, presented: str) -> ClientKey | None:
        """The key whose value is ``presented``, or ``None``.

        The presented value is hashed once and the digest looked up: comparing digests an
        attacker cannot choose (short of a SHA-256 preimage) leaks nothing about any key's
        value, so this is as safe as a constant-time comparison, and O(1) in the keys.
        """
        return self.by_sha256.get(digest(presented))


@attrs.frozen
class WorkerKey:
    """One worker key and what its workers may do; ``None`` limits are no limit."""

    name: str
    sha256: bytes = attrs.field(repr=False)
    #: Glob patterns of the model names its workers may advertise; empty: all.
    models: tuple[str, ...] = ()
    #: Workers connected with it at once.
    max_workers: int | None = None
    expires: float | None = None
    disabled: bool = False

    def allows(self, model: str) -> bool:
        """Whether its workers may serve ``model``."""
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires

    def valid(self, now: float | None = None) -> bool:
        """Whether a worker may connect (or stay connected) with it."""
        return not self.disabled and not self.expired(now)


#: The worker key of a pool without worker keys.
OPEN_WORKER = WorkerKey(ANONYMOUS, b"")


# --- KEYS_FILE and WORKER_KEYS_FILE ---------------------------------------------------------

_K = TypeVar("_K", ClientKey, WorkerKey)
_COMMON = frozenset({"name", "key", "key_sha256", "models", "expires", "disabled"})
_INTS = ("rpm", "tpm", "max_concurrent", "daily_tokens")
_FIELDS = frozenset({*_COMMON, "weight", "priority", *_INTS})
_WORKER_FIELDS = frozenset({*_COMMON, "max_workers"})


def read_keys_file(path: str | Path) -> tuple[ClientKey, ...]:
    """The keys of a ``KEYS_FILE``; any problem is a :class:`ConfigError` naming file and line."""
    return parse_keys(_read(path), source=str(path))


def read_worker_keys_file(path: str | Path) -> tuple[WorkerKey, ...]:
    """The keys of a ``WORKER_KEYS_FILE``, with the same layout and errors as a ``KEYS_FILE``."""
    return parse_worker_keys(_read(path), source=str(path))


def parse_keys(text: str, *, source: str) -> tuple[ClientKey, ...]:
    """Client keys from the text of a keys file: ``keys:``, a list of mappings."""
    return _parse(text, source, _FIELDS, _client_key)


def parse_worker_keys(text: str, *, source: str) -> tuple[WorkerKey, ...]:
    """Worker keys from the text of a worker keys file."""
    return _parse(text, source, _WORKER_FIELDS, _worker_key)


def _read(path: str | Path) -> str:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{source}: cannot read: {reason}") from None
    return text


_Build = Callable[[dict[str, tuple[Any, int]], int, str], _K]


def _parse(text: str, source: str, fields: frozenset[str], build: _Build[_K]) -> tuple[_K, ...]:
    """The keys of a file of either kind: ``fields`` are those an entry may have."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return ()
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{source}:{_line(root)}: expected a top-level 'keys:' list")
        entries: yaml.Node | None = None
        for key_node, value_node in root.value:
            if key_node.value != "keys":
                raise ConfigError(
                    f"{source}:{_line(key_node)}: unknown setting {key_node.value!r} "
                    "(a keys file has one top-level 'keys:' list)"
                )
            entries = value_node
        if entries is None or (isinstance(entries, yaml.ScalarNode) and entries.value == ""):
            return ()
        if not isinstance(entries, yaml.SequenceNode):
            raise ConfigError(f"{source}:{_line(entries)}: 'keys' must be a list of keys")
        keys = [_entry(loader, node, source, fields, build) for node in entries.value]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    seen_names: dict[str, int] = {}
    seen_keys: dict[bytes, int] = {}
    for key, line in keys:
        if key.name in seen_names:
            raise ConfigError(
                f"{source}:{line}: name {key.name!r} is used twice (first on line "
                f"{seen_names[key.name]})"
            )
        if key.sha256 in seen_keys:
            raise ConfigError(
                f"{source}:{line}: key {key.name!r} has the same value as the key on line "
                f"{seen_keys[key.sha256]}"
            )
        seen_names[key.name], seen_keys[key.sha256] = line, line
    return tuple(key for key, _ in keys)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _entry(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    source: str,
    fields: frozenset[str],
    build: _Build[_K],
) -> tuple[_K, int]:
    line = _line(node)
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{line}: each key is a mapping with at least 'name' and 'key'")
    raw: dict[str, tuple[Any, int]] = {}
    for key_node, value_node in node.value:
        field = loader.construct_object(key_node, deep=True)
        where = f"{source}:{_line(key_node)}"
        if field not in fields:
            close = difflib.get_close_matches(str(field), sorted(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}: unknown field {field!r}{hint}")
        if field == "name" and isinstance(value_node, yaml.ScalarNode):
            value: Any = value_node.value  # always text: ``name: off`` is "off", not False
        else:
            try:
                value = loader.construct_object(value_node, deep=True)
            except (ValueError, OverflowError):
                # A date YAML cannot build (``2026-13-45``): the text, for the field's own check.
                if not isinstance(value_node, yaml.ScalarNode):
                    raise ConfigError(f"{where}: {field!r} has a value that is not valid") from None
                value = value_node.value
        raw[field] = (value, _line(key_node))
    return build(raw, line, source), line


def _client_key(raw: dict[str, tuple[Any, int]], line: int, source: str) -> ClientKey:
    where = _where(raw, line, source)
    name, sha256, fields = _common(raw, line, source, plain="API_KEY")
    for field in _INTS:
        if field in raw and raw[field][0] is not None:
            fields[field] = _count(raw, field, where)
    if "weight" in raw:
        weight = raw["weight"][0]
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not MIN_WEIGHT <= weight <= MAX_WEIGHT  # nan and inf fail too
        ):
            raise ConfigError(
                f"{where('weight')}: 'weight' must be a number from {MIN_WEIGHT} to {MAX_WEIGHT}"
            )
        fields["weight"] = float(weight)
    if "priority" in raw:
        priority = raw["priority"][0]
        if (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not -MAX_PRIORITY <= priority <= MAX_PRIORITY
        ):
            raise ConfigError(
                f"{where('priority')}: 'priority' must be a whole number from {-MAX_PRIORITY} "
                f"to {MAX_PRIORITY}"
            )
        fields["priority"] = priority
    return ClientKey(name, sha256, **fields)


def _worker_key(raw: dict[str, tuple[Any, int]], line: int, source: str) -> WorkerKey:
    name, sha256, fields = _common(raw, line, source, plain="WORKER_KEY")
    if "max_workers" in raw and raw["max_workers"][0] is not None:
        fields["max_workers"] = _count(raw, "max_workers", _where(raw, line, source))
    return WorkerKey(name, sha256, **fields)


def _where(raw: dict[str, tuple[Any, int]], line: int, source: str) -> Callable[[str], str]:
    """``file:line`` of a field, or of its entry when the field is missing."""

    def where(field: str) -> str:
        return f"{source}:{raw[field][1] if field in raw else line}"

    return where


def _count(raw: dict[str, tuple[Any, int]], field: str, where: Callable[[str], str]) -> int:
    value = raw[field][0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ConfigError(f"{where(field)}: {field!r} must be a whole number from 1 to {MAX_COUNT}")
    return value


def _common(
    raw: dict[str, tuple[Any, int]], line: int, source: str, *, plain: str
) -> tuple[str, bytes, dict[str, Any]]:
    """The name, the key's SHA-256 and the fields both kinds of key have (``plain``: the
    setting whose keys are ``anonymous``)."""
    where = _where(raw, line, source)
    name, _ = raw.get("name", (None, line))
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where('name')}: 'name' is required: up to 64 letters, digits and _.@:+- "
            "(it labels logs and metrics, so never put the key itself here)"
        )
    if name == ANONYMOUS:
        raise ConfigError(f"{where('name')}: {ANONYMOUS!r} is reserved for {plain} keys")
    if ("key" in raw) == ("key_sha256" in raw):
        raise ConfigError(f"{where('name')}: key {name!r} needs exactly one of key, key_sha256")
    if "key" in raw:
        value = raw["key"][0]
        if not isinstance(value, str) or len(value) < 8 or value != value.strip():
            raise ConfigError(f"{where('key')}: 'key' must be text of at least 8 characters")
        sha256 = digest(value)
    else:
        hexed = raw["key_sha256"][0]
        if not isinstance(hexed, str) or not _HEX.match(hexed):
            raise ConfigError(f"{where('key_sha256')}: 'key_sha256' must be 64 hex digits")
        sha256 = bytes.fromhex(hexed)
    fields: dict[str, Any] = {}
    if "models" in raw:
        models = raw["models"][0]
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where('models')}: 'models' must be a list of glob patterns")
        fields["models"] = tuple(models)
    if "disabled" in raw:
        disabled = raw["disabled"][0]
        if not isinstance(disabled, bool):
            raise ConfigError(f"{where('disabled')}: 'disabled' must be true or false")
        fields["disabled"] = disabled
    if "expires" in raw and raw["expires"][0] is not None:
        fields["expires"] = _when(raw["expires"][0], where("expires"))
    return name, sha256, fields


def _when(value: object, where: str) -> float:
    """Unix time of a YAML date (midnight UTC), datetime (UTC unless it says) or ISO text."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(
                f"{where}: 'expires' must be a date or time, like 2026-01-31 or "
                "2026-01-31T18:00:00Z"
            ) from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    if isinstance(value, datetime.date):
        midnight = datetime.datetime.combine(value, datetime.time(), datetime.timezone.utc)
        return midnight.timestamp()
    raise ConfigError(f"{where}: 'expires' must be a date or time, like 2026-01-31")
