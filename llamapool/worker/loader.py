"""Find backend plugins through the ``llamapool.backends`` entry-point group.

Built-in backends are found exactly like third-party ones. Loading is lazy and per name, so a
broken plugin only fails the worker that asked for it, with an error naming the plugin and its
distribution.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from llamapool.errors import PluginError
from llamapool.plugin_api import Backend

GROUP = "llamapool.backends"
#: Backends that ship in this repository as their own distributions under plugins/.
BUNDLED = frozenset({"ollama", "vllm", "openwebui"})


def available() -> dict[str, EntryPoint]:
    """Installed backend plugins by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``; :class:`PluginError` if it cannot be used."""
    found = available()
    ep = found.get(name)
    if ep is None:
        known = ", ".join(sorted(found)) or "none"
        hint = ""
        if name in BUNDLED:
            hint = f"; install it with: pip install ./plugins/llamapool-{name}"
        raise PluginError(f"unknown backend {name!r} (installed: {known}){hint}")
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
    try:
        obj = ep.load()
    except Exception as exc:  # any import failure is the plugin's, reported as such
        raise PluginError(
            f"backend plugin {name!r} from {dist} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise PluginError(
            f"backend plugin {name!r} from {dist} is not a llamapool.plugin_api.Backend subclass"
        )
    if not getattr(obj, "paths", None):
        raise PluginError(f"backend plugin {name!r} from {dist} declares no API paths")
    return obj
