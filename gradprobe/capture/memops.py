"""The memory collector's part in the TorchFunctionMode (detail steps): after each op, name what it
saved (op and torch function), settle `input` vs `activation`, notice an op outside the model that
joins graphs of two steps (`epoch_loss += loss`), and flag saved tensors written in place.
"""

from __future__ import annotations

import time

import torch

from .savedkinds import arg_keys, key_of
from .sites import site

KEY = "gradprobe.graph"
_NOT_WRITES = {"requires_grad_", "detach_", "share_memory_", "set_", "retain_grad", "register_hook",
               "pin_memory_", "resize_", "resize_as_", "grad_", "_fix_weakref"}
_IOPS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
         "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}


class Inplace(dict):
    """func -> True when it writes into its first argument (mul_, __setitem__, copy_, ...)."""

    def __missing__(self, func):
        name = getattr(func, "__name__", "") or ""
        v = (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES) or name in _IOPS
        self[func] = v
        return v


def after_op(c, func, args, kwargs, out, sentinel) -> None:
    """After an op whose output requires grad (`c`: the MemoryCollector)."""
    o = out if isinstance(out, torch.Tensor) else next(
        (x for x in out if isinstance(x, torch.Tensor) and x.requires_grad), None)
    gf = o.grad_fn if o is not None else None
    if gf is None:
        return
    lg = c.log
    n = len(lg)
    p = c.probe
    if c.assigned < n:
        name, keys = getattr(func, "__name__", None), None
        ops = c.path.op_names(gf, c.assigned, n)
        for i in range(c.assigned, n):
            if lg.op[i] is None:
                lg.op[i] = ops(i)
            lg.func[i] = name
            sid = lg.storage[i]
            if lg.s_kind[sid] == "input?":  # data the user passes in, or made inside the op or model
                if keys is None:
                    keys = c.root_keys | (arg_keys(args, kwargs) if not p.modules.tracked_depth() else set())
                lg.s_kind[sid] = "input" if lg.s_key[sid] in keys else "activation"
        c.assigned = n
    meta = gf.metadata
    if KEY not in meta:
        meta[KEY] = sentinel(c, c.graph())  # the hooks path sees no nodes of its own
        c.path.check_shadowed()
    if not p.modules.tracked_depth():  # outside model code: does this op join graphs of two steps?
        cur = p.step_idx
        for nf, _ in gf.next_functions:
            if nf is not None and older_node(nf, cur, c.step_seq):
                lg.bridge = (site(), None, cur)
                break


def older_node(node, step, step_seq) -> bool:
    """A node of an earlier step's graph: recorded so, or (not recorded) built before this step began."""
    sn = node.metadata.get(KEY)
    if sn is not None:
        return sn.graph.step < step
    return step_seq is not None and type(node).__name__ != "AccumulateGrad" and node._sequence_nr() < step_seq


def inplace_write(c, func, args, kwargs) -> None:
    """An op wrote into a tensor: flag rows saved on that storage (except what this op saved)."""
    targets = []
    a = args[0] if args else None
    if isinstance(a, torch.Tensor):
        targets.append(a)
    elif isinstance(a, (list, tuple)):
        targets += [x for x in a if isinstance(x, torch.Tensor)]
    o = kwargs.get("out")
    if isinstance(o, torch.Tensor):
        targets.append(o)
    lg = c.log
    where = None
    for t in targets:
        sid = lg.by_key.get(key_of(t))
        rows = lg.s_live.get(sid) if sid is not None else None
        for i in list(rows or ()):
            if i >= c.assigned or i in lg.inplace:
                continue  # saved by this very op (relu_ saves its result), or flagged already
            kind = c.path.inplace_kind(i, t)
            if kind is None:
                continue
            where = where or site()
            lg.inplace[i] = (where, kind, time.perf_counter() - c.probe.t0)
            c.probe.store.version += 1
