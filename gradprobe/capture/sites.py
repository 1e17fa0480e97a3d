"""Call sites: the user's `FILE:LINE`, found by walking frames (never inspect.stack(), ~1000x slower)."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_OWN = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # gradprobe/
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_SKIP = (_OWN, _TORCH, os.path.dirname(os.path.abspath(os.__file__)) + os.sep + "contextlib.py")
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


def _first_user(f, also_skip: str | None = None):
    """The innermost frame from `f` outward that is outside torch, gradprobe and contextlib."""
    while f is not None and (_shown(f.f_code.co_filename) is None or f.f_code.co_filename == also_skip):
        f = f.f_back
    return f


def _where(f) -> str:
    """`FILE:LINE` of a user frame: one string per line, shared by every record that names it."""
    key = (f.f_code.co_filename, f.f_lineno)
    where = _sites.get(key)
    if where is None:
        where = _sites[key] = f"{_shown(key[0])}:{key[1]}"
    return where


_sites: dict[tuple, str] = {}


def site(depth: int = 1) -> str | None:
    """`FILE:LINE` of the innermost frame outside torch, gradprobe and contextlib."""
    f = _first_user(sys._getframe(depth))
    return None if f is None else _where(f)


# PyTorch running its own code: ops there are not the user's cuts (custom Function forward and
# reentrant checkpoint run under no_grad by design; optimizers, serialization, init, compile)
_INTERNAL = tuple(_TORCH + p for p in (
    "autograd" + os.sep + "function.py", "utils" + os.sep + "checkpoint.py", "optim" + os.sep,
    "serialization.py", "nn" + os.sep + "init.py", "_dynamo" + os.sep, "_functorch" + os.sep, "amp" + os.sep,
    "nn" + os.sep + "utils" + os.sep, "storage.py", "utils" + os.sep + "data" + os.sep))
_INTERNAL_FUNCS = {"_save_to_state_dict", "state_dict", "_load_from_state_dict", "load_state_dict", "_apply",
                   "__deepcopy__", "__reduce_ex__"}  # module/tensor methods in torch files PyTorch runs for itself
_internal_files: dict[str, bool] = {}


def in_torch_internals(depth: int = 1) -> bool:
    """True when the op runs inside PyTorch's own machinery, not as the user's computation.

    A frame in one of _INTERNAL's files, a state_dict/_apply/deepcopy method of torch, or the
    forward of a custom `torch.autograd.Function` (which PyTorch runs under no_grad by design).
    """
    f = sys._getframe(depth)
    while f is not None:
        code = f.f_code
        name = code.co_filename
        hit = _internal_files.get(name)
        if hit is None:
            path = os.path.abspath(name)
            hit = _internal_files[name] = 2 if path.startswith(_INTERNAL) else 1 if path.startswith(_TORCH) else 0
        if hit == 2 or (hit == 1 and code.co_name in _INTERNAL_FUNCS):
            return True
        if code.co_name == "forward" and _custom_function_forward(f):
            return True
        f = f.f_back
    return False


def _custom_function_forward(frame) -> bool:
    """Is this frame the forward of a torch.autograd.Function (ctx style or setup_context style)?"""
    code = frame.f_code
    if code.co_argcount:
        first = frame.f_locals.get(code.co_varnames[0])
        if isinstance(first, torch.autograd.function.FunctionCtx):
            return True
    owner = getattr(code, "co_qualname", "").rpartition(".")[0]
    if owner and "<" not in owner:
        obj = frame.f_globals.get(owner.split(".")[0])
        for part in owner.split(".")[1:]:
            obj = getattr(obj, part, None)
        return isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
    return False


def checkpoint_call(depth: int = 1):
    """Inside reentrant checkpoint's forward: (site of the user's `checkpoint(...)` call, its tensor inputs)."""
    f = sys._getframe(depth)
    ckpt = _TORCH + "utils" + os.sep + "checkpoint.py"
    while f is not None:
        if f.f_code.co_name == "forward" and os.path.abspath(f.f_code.co_filename) == ckpt:
            args = f.f_locals.get("args", ())
            g = _first_user(f.f_back)
            return (None if g is None else _where(g)), [a for a in args if isinstance(a, torch.Tensor)]
        f = f.f_back
    return None


def user_frame(depth: int = 1):
    """(filename, lineno) of the innermost frame outside torch, gradprobe, contextlib and warnings, or None."""
    f = _first_user(sys._getframe(depth), also_skip=warnings.__file__)
    return None if f is None else (f.f_code.co_filename, f.f_lineno)


def warnings_at_user_line():
    """A `warnings.showwarning` that moves a warning attributed to a gradprobe frame (PyTorch warned
    inside the probe's `__torch_function__`) to the user's line, where it points without the probe."""
    shown_before = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(_OWN):
            where = user_frame(2)
            if where is not None:
                filename, lineno = where
                line = None
        return shown_before(message, category, filename, lineno, file, line)

    return showwarning
