"""Backend plugins are found through entry points, built-in ones exactly like third-party ones."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamapool.errors import PluginError
from llamapool.plugin_api import Backend
from llamapool.worker.loader import available, load_backend


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
