"""The optional C++ extension `mrt_fast._native` (built by setup.py from csrc/), or None.

Every native routine has a pure-Python reference with identical results; callers fall back to it
when the extension is missing (no compiler at install time).
"""

from __future__ import annotations

from types import ModuleType


def load_native() -> ModuleType | None:
    try:
        from mrt_fast import _native
    except ImportError:
        return None
    return _native
