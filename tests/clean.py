"""Everything a probe could leave installed in the process, captured and compared.

`before = snapshot_installed(model, ...)` before a probe is entered, then after it exited
(normally or through an exception) `assert_nothing_installed(before)` (optionally with
models created while the probe ran: their parameters must carry no hooks at all).

Captured (by identity, not only by count):
- the torch-function mode stack (and the dispatch mode stack),
- the global nn.Module hooks (`torch.nn.modules.module._global_*`),
- the global optimizer hooks (`torch.optim.optimizer._global_optimizer_pre/post_hooks`),
- the whole default saved-tensors hooks stack (every level, not just the top) and whether
  saved-tensors hooks are enabled,
- `torch.autograd.backward`, `torch.autograd.grad`, `torch.autograd._engine_run_backward`
  (also `torch.autograd.graph._engine_run_backward`) and `torch.Tensor.backward`,
- grad mode, inference mode, anomaly mode, the warnings filters, sys trace/profile functions,
- for the given modules/tensors: each parameter's `_backward_hooks` and
  `_post_accumulate_grad_hooks`, and each module's forward/backward hook dicts.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.optim.optimizer as _optim
from torch import nn

_NN = torch.nn.modules.module
_NN_GLOBALS = sorted(a for a in dir(_NN) if a.startswith("_global_") and isinstance(getattr(_NN, a), dict))
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _dict_items(d) -> list:
    return [(k, v) for k, v in (d or {}).items()]


def _saved_tensors_stack() -> list:
    """The whole default saved-tensors hooks stack, bottom first (popped and pushed back unchanged)."""
    ag = torch._C._autograd
    popped = []
    try:
        while True:
            top = ag._top_saved_tensors_default_hooks(False)
            if top is None:
                break
            popped.append(top)
            ag._pop_saved_tensors_default_hooks()
    finally:
        for pack, unpack in reversed(popped):
            ag._push_saved_tensors_default_hooks(pack, unpack)
    return list(reversed(popped))


def _function_modes() -> list:
    n = torch._C._len_torch_function_stack()
    return [torch._C._get_function_stack_at(i) for i in range(n)]


def _dispatch_modes() -> int:
    return torch._C._len_torch_dispatch_stack() if hasattr(torch._C, "_len_torch_dispatch_stack") else 0


def _tensors_and_modules(objs):
    """(name, parameter) and (name, module) pairs of the given modules / tensors."""
    params, modules = [], []
    for k, obj in enumerate(objs):
        if isinstance(obj, nn.Module):
            params += [(f"{k}:{n}", p) for n, p in obj.named_parameters(remove_duplicate=False)]
            modules += [(f"{k}:{n}", m) for n, m in obj.named_modules(remove_duplicate=False)]
        elif isinstance(obj, torch.Tensor):
            params.append((f"{k}:tensor", obj))
        else:
            raise TypeError(f"snapshot_installed: expected nn.Module or Tensor, got {type(obj).__name__}")
    return params, modules


def _objects_state(objs) -> dict:
    params, modules = _tensors_and_modules(objs)
    out = {}
    for name, p in params:
        out[f"param {name} _backward_hooks"] = _dict_items(p._backward_hooks)
        out[f"param {name} _post_accumulate_grad_hooks"] = _dict_items(getattr(p, "_post_accumulate_grad_hooks", None))
    for name, m in modules:
        for d in _MODULE_HOOK_DICTS:
            if hasattr(m, d):
                out[f"module {name or '<root>'} {d}"] = _dict_items(getattr(m, d))
    return out


def _global_state() -> dict:
    state = {f"nn.{a}": _dict_items(getattr(_NN, a)) for a in _NN_GLOBALS}
    state["optim._global_optimizer_pre_hooks"] = _dict_items(_optim._global_optimizer_pre_hooks)
    state["optim._global_optimizer_post_hooks"] = _dict_items(_optim._global_optimizer_post_hooks)
    state["torch-function mode stack"] = _function_modes()
    state["dispatch mode stack length"] = _dispatch_modes()
    state["saved-tensors default hooks stack"] = _saved_tensors_stack()
    state["saved-tensors hooks enabled"] = torch._C._autograd._saved_tensors_hooks_is_enabled()
    state["torch.autograd.backward"] = torch.autograd.backward
    state["torch.autograd.grad"] = torch.autograd.grad
    state["torch.autograd._engine_run_backward"] = getattr(torch.autograd, "_engine_run_backward", None)
    state["torch.autograd.graph._engine_run_backward"] = getattr(torch.autograd.graph, "_engine_run_backward", None)
    state["torch.Tensor.backward"] = torch.Tensor.backward
    state["grad enabled"] = torch.is_grad_enabled()
    state["inference mode"] = torch.is_inference_mode_enabled()
    state["anomaly mode"] = torch.is_anomaly_enabled()
    state["warnings.filters"] = list(warnings.filters)
    state["sys.gettrace"] = sys.gettrace()
    state["sys.getprofile"] = sys.getprofile()
    return state


def snapshot_installed(*objs) -> dict:
    """Everything installed now: global state plus hooks on the given modules' parameters and modules."""
    return {"globals": _global_state(), "objects": _objects_state(objs), "objs": objs}


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def assert_nothing_installed(before: dict, *new_objs) -> None:
    """The process is as `before`: nothing of a probe (or of anything it wrapped) is left installed.

    `new_objs`: modules/tensors created after the snapshot (e.g. inside the probe); their
    parameters must carry no backward / post-accumulate-grad hooks at all.
    """
    now = _global_state()
    diffs = [f"{k}: {before['globals'][k]!r} -> {now[k]!r}" for k in before["globals"]
             if not _same(before["globals"][k], now[k])]
    objs_now = _objects_state(before["objs"])
    for k, v in before["objects"].items():
        if k.startswith("param "):
            w = objs_now.get(k, [])
            if not _same(v, w):
                diffs.append(f"{k}: {v!r} -> {w!r}")
        elif k in objs_now and not _same(v, objs_now[k]):
            diffs.append(f"{k}: {v!r} -> {objs_now[k]!r}")
    # parameters that appeared since (lazy modules materialised) carry no hooks
    for k, v in objs_now.items():
        if k.startswith("param ") and k not in before["objects"] and v:
            diffs.append(f"{k}: new parameter carries hooks {v!r}")
    params, _ = _tensors_and_modules(new_objs)
    for name, p in params:
        for d in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            hooks = _dict_items(getattr(p, d, None))
            if hooks:
                diffs.append(f"new param {name} {d}: {hooks!r}")
    assert not diffs, "left installed after the probe exited:\n  " + "\n  ".join(diffs)


def restore_installed(before: dict) -> None:
    """Put the global state back as in `before` (test isolation after a probe that leaked).

    Only undoes differences: pops function modes / saved-tensors hooks pushed since, drops global
    hooks added since, puts back the autograd entry points. Never used as a substitute for
    `assert_nothing_installed`.
    """
    g = before["globals"]
    modes = g["torch-function mode stack"]
    while torch._C._len_torch_function_stack() > len(modes):
        torch._C._pop_torch_function_stack()
    ag = torch._C._autograd
    stack = g["saved-tensors default hooks stack"]
    while len(_saved_tensors_stack()) > len(stack):
        ag._pop_saved_tensors_default_hooks()
    for a in _NN_GLOBALS:
        d = getattr(_NN, a)
        keep = dict(g[f"nn.{a}"])
        for k in [k for k in d if k not in keep]:
            del d[k]
    for name, d in (("pre", _optim._global_optimizer_pre_hooks), ("post", _optim._global_optimizer_post_hooks)):
        keep = dict(g[f"optim._global_optimizer_{name}_hooks"])
        for k in [k for k in d if k not in keep]:
            del d[k]
    torch.autograd.backward = g["torch.autograd.backward"]
    torch.autograd.grad = g["torch.autograd.grad"]
    if g["torch.autograd._engine_run_backward"] is not None:
        torch.autograd._engine_run_backward = g["torch.autograd._engine_run_backward"]
    if g["torch.autograd.graph._engine_run_backward"] is not None:
        torch.autograd.graph._engine_run_backward = g["torch.autograd.graph._engine_run_backward"]
    torch.Tensor.backward = g["torch.Tensor.backward"]
    torch.set_grad_enabled(g["grad enabled"])
    sys.settrace(g["sys.gettrace"])
    sys.setprofile(g["sys.getprofile"])


def hooks_top():
    """The saved_tensors_hooks on top of the stack (None: none installed)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)
