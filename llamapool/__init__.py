"""llamapool: pool private LLM machines behind one secure, OpenAI-compatible endpoint."""

from __future__ import annotations

from llamapool.build import package_version
from llamapool.errors import LlamapoolError

__version__ = package_version()

__all__ = ["LlamapoolError", "__version__"]
