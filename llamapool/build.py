"""Version, git SHA and build date of this installation.

A wheel carries its SHA and date in ``_build_info`` (written by ``setup.py`` at build time).
An editable install asks git, once, when asked; neither happens at import.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import attrs


@attrs.frozen
class BuildInfo:
    version: str
    sha: str
    date: str

    def __str__(self) -> str:
        return f"llamapool {self.version} (sha {self.sha}, built {self.date})"


def package_version() -> str:
    try:
        return version("llamapool")
    except PackageNotFoundError:
        return "0.0.0+unknown"


@functools.cache
def build_info() -> BuildInfo:
    try:
        stamp = importlib.import_module("llamapool._build_info")
        return BuildInfo(package_version(), str(stamp.SHA), str(stamp.DATE))
    except ImportError:
        return BuildInfo(package_version(), *_from_git())


def _from_git() -> tuple[str, str]:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--abbrev=12", "--format=%h %ct"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        sha, stamp = out.stdout.split()
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(stamp)))
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown", "unknown"
    return sha, date
