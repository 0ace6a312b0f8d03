"""Students behind one protocol (`base.py`), one sub-folder per family."""

from .base import PolicyOutput

__all__ = ["PolicyOutput"]
