"""The TorchFunctionMode that sees where tensors leave the graph (on detail steps only).

It records a cut when a tensor that depends on a trainable tensor stops carrying gradient
(detach, .data, ops under no_grad, non-differentiable ops, requires_grad_(False),
conversions to Python), tags the cut tensor with the cut's id and carries tags through
later ops (only when an input is tagged), so that a backward can tell which cut its roots
depend on. It names leaf tensors created with requires_grad=True after their line.

It is pushed only on detail steps (a Python mode costs a call per op and turns off
PyTorch's fused fast paths), steps aside inside no_grad module calls and optimizer steps,
and never reads `grad_fn` of what an op made under no_grad (a view of a parameter written
in place there has a grad_fn PyTorch refuses to build). Ops PyTorch runs for itself
(custom Function forward, checkpoint, optimizers, serialization, init) are not cuts.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .graph import upstream
from .sites import in_torch_internals, site

Tensor = torch.Tensor
_TO_PYTHON = {
    Tensor.item: "item", Tensor.tolist: "tolist", Tensor.numpy: "numpy",
    Tensor.__int__: "int", Tensor.__float__: "float", Tensor.__bool__: "bool",
    Tensor.__index__: "index",
}
_DATA_GET = Tensor.data.__get__
_SILENT = {Tensor.backward, Tensor.register_hook, Tensor.grad_fn.__get__, Tensor.requires_grad.__get__,
           Tensor.grad.__get__, Tensor.is_leaf.__get__}


def _shape_only(func) -> bool:
    """zeros_like, new_empty, ...: the output depends on the input's shape only, so nothing was cut."""
    name = getattr(func, "__name__", "")
    return name.endswith("_like") or name.startswith("new_")


def _tensors(args, kwargs):
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor):
                    yield b
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, Tensor):
                yield a


def _grad_inputs(args, kwargs):
    return [t for t in _tensors(args, kwargs) if t.requires_grad]


def _outputs(out):
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)):
        return tuple(o for o in out if isinstance(o, Tensor))
    return ()


class ProbeMode(TorchFunctionMode):
    def __init__(self, probe, cuts: bool = True) -> None:
        super().__init__()
        self.probe = probe
        self.cuts = cuts  # False: only names ops and in-place writes for the memory collector
        self.tags = WeakIdKeyDictionary()  # tensor -> frozenset of cut ids it depends on
        self.consumed: set[int] = set()  # ids of cuts whose result went back into a graph
        self.enabled = True  # False: inert until it can leave the stack (see Instruments.try_off)

    def _memory_only(self, memory, func, args, kwargs):
        out = func(*args, **kwargs)
        if memory.inplace[func] or "out" in kwargs or kwargs.get("inplace") is True:
            memory.on_inplace(func, args, kwargs)
        elif func == _DATA_GET:
            memory.on_data(out)
        elif torch.is_grad_enabled():
            o = out if isinstance(out, Tensor) else next(iter(_outputs(out)), None)
            if o is not None and o.requires_grad and o.grad_fn is not None:
                self.probe.graph_activity()
                memory.on_op(func, args, kwargs, out)
        return out

    # --- tags -------------------------------------------------------------
    def tags_of(self, tensors) -> frozenset:
        found = frozenset()
        if self.tags:
            for t in tensors:
                tag = self.tags.get(t)
                if tag:
                    found |= tag
        return found

    def _tag(self, outs, tag) -> None:
        for o in outs:
            if not (o.requires_grad and o.grad_fn is None):  # never tag a trainable leaf
                self.tags[o] = self.tags.get(o, frozenset()) | tag

    # --- cuts -------------------------------------------------------------
    def _cut(self, kind, op, sources, outs, depth=3) -> None:
        if in_torch_internals(depth):
            return
        p = self.probe
        name_of = p.targets.name_of
        up = frozenset()
        for s in sources:
            up |= upstream(s, name_of)
        cut = p.record_cut(kind, op, site(depth), up)
        if outs:
            self._tag(outs, frozenset((cut.id,)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        p = self.probe
        if not self.enabled or p.busy or func in _SILENT or torch.compiler.is_compiling():
            return func(*args, **kwargs)
        if not self.cuts:
            return self._memory_only(p.memory, func, args, kwargs)
        if func is Tensor.detach_:
            src = args[0]
            if src.requires_grad and not in_torch_internals(2):
                up = upstream(src, p.targets.name_of)
                out = func(*args, **kwargs)
                if up:
                    cut = p.record_cut("detach_", "detach_", site(2), up)
                    self._tag((src,), frozenset((cut.id,)))
                return out
            return func(*args, **kwargs)
        if func is Tensor.requires_grad_:
            src = args[0]
            flag = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
            was = src.requires_grad
            up = upstream(src, p.targets.name_of) if was and not flag and not in_torch_internals(2) else None
            out = func(*args, **kwargs)
            if up:
                p.record_cut("requires_grad_false", "requires_grad_", site(2), up)
            elif flag and not was and src.grad_fn is None:
                p.targets.leaf_names[src] = f"tensor@{site(2)}"
            return out
        out = func(*args, **kwargs)
        memory = p.memory
        if memory is not None:
            if memory.inplace[func] or "out" in kwargs or kwargs.get("inplace") is True:
                memory.on_inplace(func, args, kwargs)
            elif func == _DATA_GET:
                memory.on_data(out)
        op = _TO_PYTHON.get(func)
        if op is not None:
            if args[0].requires_grad:
                self._cut("to_python", op, (args[0],), ())
            return out
        outs = _outputs(out)
        if not outs:
            return out
        if not torch.is_grad_enabled():
            # no graph is built here: never read grad_fn. A fresh (not in-place, not view) result of
            # trainable inputs is a no_grad cut; views and in-place writes (init, padding rows) are not.
            o = outs[0]
            if o.requires_grad or any(x is o for x in _tensors(args, kwargs)) or o._is_view():
                return out
            sources = _grad_inputs(args, kwargs)
            if sources and not _shape_only(func) and func is not Tensor.detach and func != _DATA_GET:
                self._cut("no_grad", getattr(func, "__name__", str(func)), sources, outs)
            elif sources and (func is Tensor.detach or func == _DATA_GET):
                self._cut("detach" if func is Tensor.detach else "data",
                          "detach" if func is Tensor.detach else "data", sources, outs)
            return out
        if self.tags:
            tag = self.tags_of(_tensors(args, kwargs))
            if tag:
                if any(o.requires_grad for o in outs):
                    self.consumed |= tag
                self._tag(outs, tag)
        if any(o.requires_grad for o in outs):
            o = outs[0]
            if o.grad_fn is None:
                if o.requires_grad and o not in p.targets.leaf_names and not _grad_inputs(args, kwargs):
                    p.targets.leaf_names[o] = f"tensor@{site(2)}"  # a new leaf: torch.tensor(..., requires_grad=True)
            else:
                p.graph_activity()
            if memory is not None:
                memory.on_op(func, args, kwargs, out)
            return out
        sources = _grad_inputs(args, kwargs)
        if sources and not _shape_only(func):
            if func is Tensor.detach:
                kind, op = "detach", "detach"
            elif func == _DATA_GET:  # method-wrappers are made anew per access: compare, not `is`
                kind, op = "data", "data"
            else:
                kind, op = "non_differentiable", getattr(func, "__name__", str(func))
            self._cut(kind, op, sources, outs)
        return out
