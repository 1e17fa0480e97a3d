"""The TorchFunctionMode that sees where tensors leave the graph.

It records a cut when a tensor that depends on a trainable tensor stops
carrying gradient (detach, .data, no_grad ops, non-differentiable ops,
requires_grad_(False), conversions to Python), tags the cut tensor with the
cut's id and carries tags through later ops (only when an input is tagged),
so that a backward can tell which cut its roots depend on. It also names
leaf tensors created with requires_grad=True after their line.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .cuts import upstream_leaves
from .sites import site

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
    def __init__(self, probe) -> None:
        super().__init__()
        self.probe = probe
        self.tags = WeakIdKeyDictionary()  # tensor -> frozenset of cut ids it depends on

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
    def _cut(self, kind, op, sources, outs) -> None:
        p = self.probe
        name_of = p.targets.name_of
        up = frozenset()
        for s in sources:
            up |= upstream_leaves(s, name_of)
        cut = p.record_cut(kind, op, site(3), up)
        self._tag(outs, frozenset((cut.id,)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        p = self.probe
        if p.quiet or func in _SILENT:
            return func(*args, **kwargs)
        if func is Tensor.detach_:
            src = args[0]
            up = upstream_leaves(src, p.targets.name_of) if src.requires_grad else None
            out = func(*args, **kwargs)
            if up:
                cut = p.record_cut("detach_", "detach_", site(2), up)
                self._tag((src,), frozenset((cut.id,)))
            return out
        if func is Tensor.requires_grad_:
            src = args[0]
            flag = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
            was = src.requires_grad
            up = upstream_leaves(src, p.targets.name_of) if was and not flag else None
            out = func(*args, **kwargs)
            if up:
                p.record_cut("requires_grad_false", "requires_grad_", site(2), up)
            elif flag and not was and src.grad_fn is None:
                p.targets.leaf_names[src] = f"tensor@{site(2)}"
            return out
        out = func(*args, **kwargs)
        if p.memory is not None and (p.memory.inplace[func] or "out" in kwargs or kwargs.get("inplace") is True):
            p.memory.on_inplace(func, args, kwargs)
        op = _TO_PYTHON.get(func)
        if op is not None:
            if args[0].requires_grad:
                self._cut("to_python", op, (args[0],), ())
            return out
        outs = _outputs(out)
        if not outs:
            return out
        if self.tags:
            tag = self.tags_of(_tensors(args, kwargs))
            if tag:
                self._tag(outs, tag)
        if any(o.requires_grad for o in outs):
            o = outs[0]
            if o.grad_fn is None and o.requires_grad and o not in p.targets.leaf_names \
                    and not _grad_inputs(args, kwargs):
                p.targets.leaf_names[o] = f"tensor@{site(2)}"  # a new leaf: torch.tensor(..., requires_grad=True)
            if p.memory is not None:
                p.memory.on_op(func, args, kwargs, out)
            return out
        sources = _grad_inputs(args, kwargs)
        if sources and not _shape_only(func):
            if func is Tensor.detach:
                kind, op = "detach", "detach"
            elif func == _DATA_GET:  # method-wrappers are made anew per access: compare, not `is`
                kind, op = "data", "data"
            elif not torch.is_grad_enabled():
                kind, op = "no_grad", getattr(func, "__name__", str(func))
            else:
                kind, op = "non_differentiable", getattr(func, "__name__", str(func))
            self._cut(kind, op, sources, outs)
        return out
