"""Call sites: the user's `FILE:LINE`, found by walking frames (never inspect.stack(), ~1000x slower)."""

from __future__ import annotations

import os
import sys

import torch

_SKIP = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(os.__file__)) + os.sep + "contextlib.py",
)
_names: dict[str, str | None] = {}  # co_filename -> shown path (None: skip this frame)


def _shown(filename: str) -> str | None:
    shown = _names.get(filename, "?")
    if shown == "?":
        path = os.path.abspath(filename)
        if path.startswith(_SKIP) or filename.startswith("<frozen"):
            shown = None
        else:
            cwd = os.getcwd() + os.sep
            shown = path[len(cwd):] if path.startswith(cwd) else filename
        _names[filename] = shown
    return shown


def site(depth: int = 1) -> str | None:
    """`FILE:LINE` of the innermost frame outside torch, gradprobe and contextlib."""
    f = sys._getframe(depth)
    while f is not None:
        shown = _shown(f.f_code.co_filename)
        if shown is not None:
            return f"{shown}:{f.f_lineno}"
        f = f.f_back
    return None
