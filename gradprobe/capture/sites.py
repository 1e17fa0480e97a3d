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
# Frameworks a user's script calls into: their frames are not the user's line (found without importing them)
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers", "peft",
              "torchvision", "torchmetrics", "timm", "deepspeed", "diffusers", "lightning_utilities")
_INSTALLED = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)
_STDLIB = os.path.dirname(os.path.abspath(os.__file__)) + os.sep  # threading, runpy, multiprocessing...
_framework_dirs: tuple | None = None
_frameworks: dict[str, bool] = {}  # co_filename -> inside an installed framework


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


def _in_framework(filename: str) -> bool:
    """Installed code, not the user's: a file in site-packages/dist-packages (looked for in the path
    below the working directory when the file is inside it: a project's .venv counts, a project kept in
    site-packages and run from there does not), of a known framework wherever it is installed (editable
    installs), of the standard library, or code generated with exec (`<string>`: dataclasses' and
    namedtuples' __init__)."""
    hit = _frameworks.get(filename)
    if hit is None:
        global _framework_dirs
        if _framework_dirs is None:
            _framework_dirs = _find_frameworks()
        path = os.path.abspath(filename)
        cwd = os.getcwd() + os.sep
        below = os.sep + (path[len(cwd):] if path.startswith(cwd) else path.lstrip(os.sep))
        hit = _frameworks[filename] = (filename == "<string>" or any(s in below for s in _INSTALLED)
                                       or path.startswith(_framework_dirs) or path.startswith(_STDLIB))
    return hit


def _find_frameworks() -> tuple:
    import importlib.util
    dirs = []
    for name in FRAMEWORKS:
        try:
            spec = importlib.util.find_spec(name)  # top-level names: located, not imported
        except (ImportError, ValueError):
            continue
        for d in (spec.submodule_search_locations or []) if spec is not None else []:
            dirs.append(os.path.abspath(d) + os.sep)
    return tuple(dirs)


def _first_user(f, also_skip: str | None = None, frameworks: bool = True):
    """The innermost frame from `f` outward that is outside torch, gradprobe and contextlib, and (with
    `frameworks`) outside installed frameworks (Lightning, transformers, accelerate...); when every such
    frame is in a framework, the innermost of them."""
    first = None
    while f is not None:
        name = f.f_code.co_filename
        if _shown(name) is not None and name != also_skip:
            if not frameworks or not _in_framework(name):
                return f
            if first is None:
                first = f
        f = f.f_back
    return first


def _where(f) -> str:
    """`FILE:LINE` of a user frame: one string per line, shared by every record that names it."""
    key = (f.f_code.co_filename, f.f_lineno)
    where = _sites.get(key)
    if where is None:
        where = _sites[key] = f"{_shown(key[0])}:{key[1]}"
    return where


_sites: dict[tuple, str] = {}


def site(depth: int = 1) -> str | None:
    """`FILE:LINE` of the user's innermost frame: outside torch, gradprobe, contextlib and frameworks."""
    f = _first_user(sys._getframe(depth))
    return None if f is None else _where(f)


# PyTorch running its own code: ops there are not the user's cuts. Custom Function forward, reentrant
# checkpoint, compile and torch.func run the user's code under no_grad or tracing by design: internal
# whatever runs inside. Optimizers, serialization, init, amp, nn.utils and data loading are internal only
# for their own ops: a user frame between (a closure given to optimizer.step, as Lightning runs the
# training step; a function decorated with autocast) is the user's computation again.
_sep = os.sep
_ALWAYS = tuple(_TORCH + p for p in (
    f"autograd{_sep}function.py", f"utils{_sep}checkpoint.py", f"_dynamo{_sep}", f"_functorch{_sep}"))
_OWN_CODE = tuple(_TORCH + p for p in (
    f"optim{_sep}", "serialization.py", f"nn{_sep}init.py", f"amp{_sep}", f"nn{_sep}utils{_sep}", "storage.py",
    f"utils{_sep}data{_sep}"))
_INTERNAL_FUNCS = {"_save_to_state_dict", "state_dict", "_load_from_state_dict", "load_state_dict", "_apply",
                   "__deepcopy__", "__reduce_ex__"}  # module/tensor methods in torch files PyTorch runs for itself
_internal_files: dict[str, int] = {}  # co_filename -> 3 always internal, 2 own code, 1 other torch, 0 user, -1 other


def in_torch_internals(depth: int = 1) -> bool:
    """True when the op runs inside PyTorch's own machinery, not as the user's computation.

    A frame in one of _ALWAYS's files, in one of _OWN_CODE's with no user frame between it and the op,
    a state_dict/_apply/deepcopy method of torch, or the forward of a custom `torch.autograd.Function`
    (which PyTorch runs under no_grad by design).
    """
    f = sys._getframe(depth)
    user = False
    while f is not None:
        code = f.f_code
        name = code.co_filename
        hit = _internal_files.get(name)
        if hit is None:
            path = os.path.abspath(name)
            hit = _internal_files[name] = (
                3 if path.startswith(_ALWAYS) else 2 if path.startswith(_OWN_CODE) else 1 if path.startswith(_TORCH)
                else 0 if _shown(name) is not None and not _in_framework(name) else -1)
        if hit == 3 or (hit == 2 and not user) or (hit == 1 and code.co_name in _INTERNAL_FUNCS):
            return True
        if code.co_name == "forward" and _custom_function_forward(f):
            return True
        user = user or hit == 0
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


_CHECKPOINT = _TORCH + "utils" + os.sep + "checkpoint.py"


def _in_checkpoint_file(f) -> bool:
    name = f.f_code.co_filename
    return name.endswith("checkpoint.py") and os.path.abspath(name) == _CHECKPOINT


def checkpoint_call(depth: int = 1):
    """Inside reentrant checkpoint's forward: (site of the user's `checkpoint(...)` call, its tensor inputs)."""
    f = sys._getframe(depth)
    while f is not None:
        if f.f_code.co_name == "forward" and _in_checkpoint_file(f):
            args = f.f_locals.get("args", ())
            g = _first_user(f.f_back)
            return (None if g is None else _where(g)), [a for a in args if isinstance(a, torch.Tensor)]
        f = f.f_back
    return None


def checkpoint_region(depth: int = 1) -> str | None:
    """Inside `torch.utils.checkpoint` (any schedule): the site of the user's outermost `checkpoint(...)` call
    (through frameworks such as transformers, the user's line that called into them); else None."""
    f = sys._getframe(depth)
    outer = None
    while f is not None:
        if _in_checkpoint_file(f):
            outer = f
        f = f.f_back
    g = None if outer is None else _first_user(outer.f_back)
    return None if g is None else _where(g)


def user_frame(depth: int = 1):
    """(filename, lineno) of the innermost frame outside torch, gradprobe, contextlib and warnings, or None
    (frameworks' frames count: a warning goes where it would point without the probe)."""
    f = _first_user(sys._getframe(depth), also_skip=warnings.__file__, frameworks=False)
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
