"""Settings read from files: systemd-style env files and the worker's YAML file.

Files are the lowest explicit source: a flag beats an environment variable, which beats a file,
which beats the built-in default.
The CLI gets that order from click by loading files into the context's ``default_map``, which
click consults after the command line and the environment.
This module turns a file into validated ``default_map`` entries and reports any problem as one
:class:`~llamapool.errors.ConfigError` naming the file and the line.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import click
import yaml

from llamapool.errors import ConfigError

#: Parameters a file cannot set: they say which files to read in the first place.
NOT_IN_FILES = frozenset({"config", "env_file"})


@attrs.frozen
class Entry:
    """One ``key = value`` read from a file, with the line it came from (1-based)."""

    key: str
    value: object
    line: int


def normalize_key(key: str) -> str:
    """One spelling for ``SERVER_URL``, ``server_url``, ``server-url`` and Go's ``serverurl``.

    Go's worker unmarshals YAML into a struct without tags, so its keys are field names in lower
    case; ignoring case, ``_`` and ``-`` accepts those, env var names and option names alike.
    """
    return re.sub(r"[-_]", "", key).lower()


# --- env files ------------------------------------------------------------------------------

_ENV_KEY = re.compile(r"(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.]*)[ \t]*=[ \t]*")
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


def parse_env_file(text: str, *, source: str) -> list[Entry]:
    """``KEY=value`` lines the way systemd's ``EnvironmentFile=`` reads them.

    Blank lines and lines starting with ``#`` or ``;`` are skipped; an ``export`` prefix is
    allowed (so the file can also be sourced by a shell).
    Single quotes keep everything literally, double quotes understand ``\\"``, ``\\\\``,
    ``\\``` and ``\\$``, a backslash before a newline continues the value on the next line,
    and unquoted values lose surrounding whitespace.
    As in systemd, ``#`` after a value is part of the value, not a comment.
    """
    entries: list[Entry] = []
    i, line, end = 0, 1, len(text)
    while i < end:
        char = text[i]
        if char == "\n":
            i, line = i + 1, line + 1
        elif char.isspace():
            i += 1
        elif char in "#;":
            newline = text.find("\n", i)
            i = end if newline < 0 else newline
        else:
            match = _ENV_KEY.match(text, i)
            if match is None:
                raise ConfigError(f"{source}:{line}: expected KEY=value")
            value, i, last_line = _env_value(text, match.end(), line, source=source)
            entries.append(Entry(match.group(1), value, line))
            line = last_line
    return entries


def _env_value(text: str, i: int, line: int, *, source: str) -> tuple[str, int, int]:
    """The value starting at ``text[i]``; returns it, the index of its end and its last line."""
    start_line, end = line, len(text)
    out: list[str] = []
    pending = ""  # unquoted whitespace, kept only if more of the value follows
    while i < end and text[i] != "\n":
        char = text[i]
        if char == "'":
            close = text.find("'", i + 1)
            if close < 0:
                raise ConfigError(f"{source}:{start_line}: unterminated single quote")
            quoted = text[i + 1 : close]
            out += [pending, quoted]
            pending, line, i = "", line + quoted.count("\n"), close + 1
        elif char == '"':
            quoted, i, line = _double_quoted(text, i + 1, line, start_line, source=source)
            out += [pending, quoted]
            pending = ""
        elif char == "\\" and i + 1 < end:
            if text[i + 1] == "\n":
                line += 1
            else:
                out += [pending, text[i + 1]]
                pending = ""
            i += 2
        elif char.isspace():
            pending += char
            i += 1
        else:
            out += [pending, char]
            pending = ""
            i += 1
    return "".join(out), i, line


def _double_quoted(
    text: str, i: int, line: int, start_line: int, *, source: str
) -> tuple[str, int, int]:
    out: list[str] = []
    end = len(text)
    while i < end:
        char = text[i]
        if char == '"':
            return "".join(out), i + 1, line
        if char == "\\" and i + 1 < end:
            following = text[i + 1]
            if following == "\n":
                line += 1
            elif following in _DOUBLE_QUOTE_ESCAPES:
                out.append(following)
            else:
                out.append(char + following)
            i += 2
            continue
        if char == "\n":
            line += 1
        out.append(char)
        i += 1
    raise ConfigError(f"{source}:{start_line}: unterminated double quote")


# --- YAML -----------------------------------------------------------------------------------


def parse_yaml(text: str, *, source: str) -> list[Entry]:
    """Top-level ``key: value`` pairs of a YAML document, with their line numbers.

    This is :func:`yaml.safe_load` taken one step at a time: the safe loader composes the
    document, and each top-level pair is constructed on its own so its line is known.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(
                f"{source}:{node.start_mark.line + 1}: expected 'setting: value' lines"
            )
        entries = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = loader.construct_object(key_node, deep=True)
            value = loader.construct_object(value_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(f"{source}:{line}: a setting name must be text, got {key!r}")
            if isinstance(value, (dict, set)):
                raise ConfigError(f"{source}:{line}: {key}: expected a single value")
            if isinstance(value, list) and not all(_scalar(v) for v in value):
                raise ConfigError(
                    f"{source}:{line}: {key}: expected a list of single values "
                    "(quote entries such as 'Name: value')"
                )
            entries.append(Entry(key, value, line))
        return entries
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _scalar(value: object) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


# --- into click's default_map ---------------------------------------------------------------


def read_entries(path: Path, *, yaml_file: bool) -> list[Entry]:
    """Parse ``path`` as a YAML file or an env file; a missing or unreadable file is an error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read: {reason}") from None
    parse = parse_yaml if yaml_file else parse_env_file
    return parse(text, source=str(path))


def settable(command: click.Command) -> dict[str, click.Option]:
    """Every spelling of every setting a file may hold, normalized, mapped to its option."""
    return {
        spelling: option
        for option in _options(command)
        if option.name not in NOT_IN_FILES
        for spelling in _spellings(option)
    }


def to_default_map(ctx: click.Context, entries: Iterable[Entry], *, source: str) -> dict[str, Any]:
    """Validate ``entries`` against the command's options; the result feeds ``default_map``.

    Values are converted by the option's own type now, so a bad value is reported with its
    file and line rather than later as if it had come from the command line.
    Empty values count as unset, as click treats empty environment variables.
    Later lines win over earlier ones, as in systemd.
    A repeatable option (``--header``) takes a text split as its environment variable is, or,
    from YAML, a list of entries.
    """
    options = settable(ctx.command)
    blocked = {"configfile", "envfile"}.union(
        *(_spellings(o) for o in _options(ctx.command) if o.name in NOT_IN_FILES)
    )
    values: dict[str, Any] = {}
    for entry in entries:
        where = f"{source}:{entry.line}"
        key = normalize_key(entry.key)
        if key in blocked:
            raise ConfigError(
                f"{where}: {entry.key} cannot be set in a file; "
                "use the flag or the environment variable"
            )
        option = options.get(key)
        if option is None:
            raise ConfigError(f"{where}: unknown setting {entry.key!r}{_hint(key, options)}")
        if entry.value is None or entry.value == "" or entry.value == []:
            continue
        if isinstance(entry.value, bool) and not isinstance(option.type, click.types.BoolParamType):
            raise ConfigError(f"{where}: {entry.key}: expected a value, got {entry.value}")
        value = entry.value
        if isinstance(value, list) and not option.multiple:
            raise ConfigError(f"{where}: {entry.key}: expected a single value")
        if option.multiple:  # a list holds one entry an item; text is split like the variable
            items = value if isinstance(value, list) else option.type.split_envvar_value(str(value))
            value = [str(item) for item in items]
        try:
            values[str(option.name)] = option.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise ConfigError(f"{where}: {entry.key}: {exc.message}") from None
    return values


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.envvar and p.name]


def _envvars(option: click.Option) -> list[str]:
    return [option.envvar] if isinstance(option.envvar, str) else list(option.envvar or ())


def _spellings(option: click.Option) -> set[str]:
    return {normalize_key(s) for s in [str(option.name), *_envvars(option), *option.opts]}


def _hint(key: str, options: Mapping[str, click.Option]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {_envvars(options[close[0]])[0]}?)" if close else ""


# --- OS defaults (the Go worker's) ----------------------------------------------------------


def default_worker_config(
    *, platform: str | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """Where the worker looks for ``worker.yaml`` when ``--config`` is not given.

    Like the Go worker: on macOS ``~/Library/Application Support/llamapool/worker.yaml``, on
    Windows ``%ProgramData%\\llamapool\\worker.yaml``, elsewhere nowhere.
    """
    base = _app_dir(platform, environ, mac="Library/Application Support/llamapool")
    return None if base is None else base / "worker.yaml"


def default_worker_log_dir(
    *, platform: str | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The Go worker's log directory, on macOS and Windows only.

    ``~/Library/Logs/llamapool`` or ``%ProgramData%\\llamapool\\Logs``.
    """
    base = _app_dir(platform, environ, mac="Library/Logs/llamapool")
    if base is None:
        return None
    return base if (platform or sys.platform) == "darwin" else base / "Logs"


def _app_dir(platform: str | None, environ: Mapping[str, str] | None, *, mac: str) -> Path | None:
    """``platform`` and ``environ`` default to this machine's, read at call time."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    if platform == "darwin":
        home = environ.get("HOME") or str(Path.home())
        return Path(home, *mac.split("/"))
    if platform == "win32":
        program_data = environ.get("ProgramData") or environ.get("PROGRAMDATA") or r"C:\ProgramData"
        return Path(program_data.rstrip("\\/"), "llamapool")
    return None
