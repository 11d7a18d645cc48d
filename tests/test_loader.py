"""Backend plugins are found through entry points, built-in ones exactly like third-party ones."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from llamapool.config import WorkConfig
from llamapool.errors import PluginError
from llamapool.plugin_api import Backend, BackendSettings
from llamapool.worker.agent import Agent
from llamapool.worker.loader import available, load_backend

from .cli_helpers import cli_env, run_cli
from .conftest import WORKER_KEY, PoolServer, wait_for


@pytest.fixture
def third_party(tmp_path: Path) -> Iterator[Path]:
    """A directory on sys.path where tests install tiny plugin distributions."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("lp_fake_")]:
        del sys.modules[name]


def install_plugin(site: Path, dist: str, entry: str, module: str, source: str) -> None:
    """Write a real distribution (a module plus dist-info with an entry point) into ``site``."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[llamapool.backends]\n{entry} = {module}:Plugin\n")


def test_built_in_backends_are_entry_points() -> None:
    """The demo backend and the three bundled plugins are all found in the entry-point group."""
    assert {"demo", "ollama", "vllm", "openwebui"} <= set(available())


def test_load_returns_the_backend_class() -> None:
    """Loading a name gives its Backend subclass."""
    cls = load_backend("demo")
    assert issubclass(cls, Backend)
    assert "/v1/chat/completions" in cls.paths


def test_unknown_backend_names_the_installed_ones() -> None:
    """An unknown name is a PluginError listing what is installed."""
    with pytest.raises(PluginError) as info:
        load_backend("nope")
    assert "unknown backend 'nope'" in str(info.value)
    assert "ollama" in str(info.value)


def test_third_party_plugin_is_loaded(third_party: Path) -> None:
    """A third-party distribution's backend loads like a built-in one."""
    install_plugin(
        third_party,
        "lp-fake-good",
        "fakegood",
        "lp_fake_good",
        "from llamapool.plugin_api import Backend, OPENAI_PATHS\n"
        "class Plugin(Backend):\n"
        "    paths = OPENAI_PATHS\n"
        "    default_url = 'http://127.0.0.1:1'\n"
        "    async def list_models(self, http):\n"
        "        return ['m']\n",
    )
    assert "Plugin" == load_backend("fakegood").__name__


def test_broken_plugin_names_itself_and_its_distribution(third_party: Path) -> None:
    """A plugin that fails to import is a PluginError naming it and its distribution."""
    install_plugin(
        third_party, "lp-fake-broken", "fakebroken", "lp_fake_broken", "raise ImportError('boom')\n"
    )
    with pytest.raises(PluginError) as info:
        load_backend("fakebroken")
    message = str(info.value)
    assert "'fakebroken'" in message
    assert "lp-fake-broken 1.2.3" in message
    assert "boom" in message


def test_broken_plugin_does_not_affect_others(third_party: Path) -> None:
    """One broken plugin leaves every other backend loadable."""
    install_plugin(third_party, "lp-fake-broken2", "fakebroken2", "lp_fake_broken2", "1/0\n")
    with pytest.raises(PluginError):
        load_backend("fakebroken2")
    assert issubclass(load_backend("ollama"), Backend)


def test_entry_point_that_is_not_a_backend_is_rejected(third_party: Path) -> None:
    """An entry point naming something that is not a Backend subclass is a PluginError."""
    install_plugin(third_party, "lp-fake-odd", "fakeodd", "lp_fake_odd", "Plugin = 42\n")
    with pytest.raises(PluginError) as info:
        load_backend("fakeodd")
    assert "not a llamapool.plugin_api.Backend subclass" in str(info.value)


# --- a plugin's own bugs, past loading ------------------------------------------------------

_FAILING = (
    "from llamapool.plugin_api import Backend, OPENAI_PATHS\n"
    "class Plugin(Backend):\n"
    "    paths = OPENAI_PATHS\n"
    "    default_url = 'http://127.0.0.1:1'\n"
    "    def __init__(self, settings):\n"
    "        super().__init__(settings)\n"
    "        if {where!r} == 'init':\n"
    "            raise RuntimeError('bad settings')\n"
    "    async def start(self):\n"
    "        if {where!r} == 'start':\n"
    "            raise RuntimeError('cannot start')\n"
    "    async def list_models(self, http):\n"
    "        raise KeyError('models')\n"
)


@pytest.mark.parametrize(("where", "why"), [("init", "bad settings"), ("start", "cannot start")])
def test_a_plugin_failing_to_start_is_one_cli_line(third_party: Path, where: str, why: str) -> None:
    """A plugin whose constructor or ``start`` raises ends ``work`` with one line naming it,
    not a traceback."""
    module = f"lp_fake_fails_{where}"
    install_plugin(
        third_party, f"lp-fake-{where}", f"fails{where}", module, _FAILING.format(where=where)
    )
    env = cli_env(
        PYTHONPATH=str(third_party),
        WORKER_KEY="k",
        SERVER_URL="ws://127.0.0.1:9/workers/connect",
    )

    result = run_cli("work", "--backend", f"fails{where}", env=env)

    assert 1 == result.returncode
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"llamapool: error: the fails{where} plugin failed to start: RuntimeError: {why}"
    )


async def test_a_plugin_failing_to_list_models_leaves_the_worker_up_and_not_ready(
    third_party: Path, pool_server: PoolServer
) -> None:
    """A plugin whose model list raises something other than BackendError: the backend counts
    as down (said once, with the plugin's traceback, however many checks fail), and the worker
    stays connected, not ready."""
    source = _FAILING.format(where="list").replace(
        "        raise KeyError", "        Plugin.calls += 1\n        raise KeyError"
    )
    install_plugin(
        third_party,
        "lp-fake-list",
        "failslist",
        "lp_fake_fails_list",
        source + "Plugin.calls = 0\n",
    )
    plugin = load_backend("failslist")
    cfg = WorkConfig(server_url=pool_server.ws_url, worker_key=WORKER_KEY, probe_interval=0.05)
    agent = Agent(cfg, plugin(BackendSettings(url="")), backend_name="failslist")
    with capture_logs() as events:
        running = asyncio.create_task(agent.run())
        try:
            await wait_for(agent.registered.is_set, what="the worker registered")
            await wait_for(lambda: plugin.calls >= 5, what="five checks")  # type: ignore[attr-defined]
            worker = pool_server.pool.get(cfg.worker_id)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    failures = [e for e in events if e["event"] == "backend_unreachable"]
    assert worker is not None
    assert not worker.ready
    assert "backend: the failslist plugin failed: KeyError: 'models'" == agent.last_error
    assert 1 == len(failures)
    assert isinstance(failures[0]["exc_info"], KeyError)
