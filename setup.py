"""Stamp the build with its git SHA and date; everything else is in setup.cfg."""

from __future__ import annotations

import datetime
import pathlib
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=pathlib.Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class StampedBuild(build_py):  # type: ignore[misc]
    """Write llamapool/_build_info.py into the build, never into the source tree."""

    def run(self) -> None:
        super().run()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        # The build's own time: a wheel records when it was made, an editable install (no
        # build) reports its last commit's time instead.
        target = pathlib.Path(self.build_lib) / "llamapool" / "_build_info.py"
        target.write_text(f'SHA = "{_git_sha()}"\nDATE = "{date}"\n')


setup(cmdclass={"build_py": StampedBuild})
