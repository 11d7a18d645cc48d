"""``python -m llamapool``."""

from __future__ import annotations

from llamapool.cli import main

if __name__ == "__main__":
    main()
