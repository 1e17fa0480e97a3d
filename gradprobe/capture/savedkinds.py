"""What a saved storage is: parameter, buffer, input, activation, or autocast's cast of a parameter.

Parameters and buffers are matched by storage (a saved view or transpose of a weight is the
weight), so they are never counted as what `torch.no_grad()` would save. A leaf that does not
require grad is an `input` only if the user passed it in (to the model's root call, or to an op
outside the model such as the loss); one made inside the model (an LSTM's zero initial state, a
mask) exists because of the graph: `activation`. That is decided after the op by `memops`.
"""

from __future__ import annotations

import torch

from .graph import tensors_in


class Kinds:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.keys: dict = {}  # storage key -> (kind, name) of tracked parameters and module buffers
        self._n_known = (-1, -1)

    def refresh(self) -> None:
        """Storage key -> (kind, name) of tracked parameters and their modules' buffers."""
        targets = self.probe.targets
        n = (len(targets.tracked), len(targets.modules))
        if n == self._n_known:
            return
        self._n_known = n
        keys = {}
        for info in targets.modules:
            m = info.ref()
            if m is not None:
                for name, b in m.named_buffers(recurse=False):
                    if isinstance(b, torch.Tensor):
                        _add(keys, b, ("buffer", ".".join(x for x in (info.name, name) if x)))
        for t in targets.tracked:
            p = t.ref()
            if p is not None and t.kind == "parameter":
                _add(keys, p, ("parameter", t.name))
        self.keys = keys

    def of(self, t, key):
        """(kind, parameter or buffer name) of a tensor just saved; kind `input?` is settled after the op."""
        known = self.keys.get(key)
        if known is not None:
            return known
        base = t._base if (not t.is_leaf and t._is_view()) else t
        if not base.is_leaf:
            cast = cast_of(base, self.probe.targets.by_tensor)
            return ("cast", cast) if cast is not None else ("activation", None)
        if base.requires_grad:
            targets = self.probe.targets
            tr = targets.by_tensor.get(base)
            named = targets.leaf_names.get(base) if self.probe.discover and tr is None else None
            if tr is not None or named is not None or isinstance(base, torch.nn.Parameter):
                return "parameter", tr.name if tr is not None else named
            return "input", None  # a user tensor that wants a gradient, not a parameter
        return "input?", None


def cast_of(t, by_tensor):
    """Name of the parameter `t` is a dtype copy of (autocast's weight cast), else None."""
    gf = t.grad_fn
    if gf is None or type(gf).__name__ != "ToCopyBackward0":
        return None
    nxt = gf.next_functions
    var = getattr(nxt[0][0], "variable", None) if nxt and nxt[0][0] is not None else None
    tr = by_tensor.get(var) if var is not None else None
    return tr.name if tr is not None else None


def key_of(t, ptr=None):
    """A storage's identity: its data pointer (and device index on CUDA)."""
    if ptr is None:
        ptr = t.untyped_storage().data_ptr()
    return ptr if not t.is_cuda else (ptr, t.get_device())


def keys_of(tensors) -> set:
    """Storage keys of tensors (those without a storage of their own left out)."""
    keys = set()
    for t in tensors:
        try:
            keys.add(key_of(t))
        except Exception:
            pass
    return keys


def arg_keys(args, kwargs) -> set:
    return keys_of(tensors_in((args, kwargs)))


def _add(keys: dict, t, what) -> None:
    """Key a parameter or buffer by its storage; a DTensor (FSDP2) by its local shard's."""
    t = getattr(t, "_local_tensor", t)
    try:
        keys[key_of(t)] = what
    except RuntimeError:  # a tensor without a Python-visible storage: not keyed, its saves count as inputs
        pass
