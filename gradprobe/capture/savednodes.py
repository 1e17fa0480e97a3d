"""Saved tensors read from each new autograd node (torch >= 2.14: `node_creation_hook`).

No saved-tensor hooks are installed, so torch.func, checkpoint, save_on_cpu and the user's own
hooks run as without the probe. The hook fires once per node after its saved tensors are stored;
it reads them (`_saved_*`, or `saved_tensors` of a custom Function) only where no saved-tensor
hooks packed them (it never unpacks through someone's hooks: an offloaded tensor is never copied
back), and leaves a Sentinel in the node's metadata whose post hook says which backward used and
released them, and whose death says when the graph let go. The hook is pushed on the probe's
thread for detail steps and popped off them, but only while no hook pushed by someone else sits
above it (pushes and pops by others are counted); otherwise it stays and is inert.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .handles import Patch
from .memops import KEY as _KEY
from .memory import Sentinel

log = logging.getLogger("gradprobe")
_C = torch._C._autograd


def available() -> bool:
    return callable(getattr(_C, "_push_node_creation_hook", None))


class NodePath:
    def __init__(self, c) -> None:
        self.c = c
        self.hook = self._on_node  # one bound method: pushed and popped as itself
        self.on = False  # on the probe thread's hook stack
        self.live = False  # recording
        self.foreign = 0  # hooks others pushed on the probe's thread and have not popped
        self.thread = None
        self.patches: list = []
        self.names: dict = {}  # node type -> attributes holding its saved tensors
        self.aliases = WeakIdKeyDictionary()  # results of `.data`: writes through them are invisible to autograd
        self.push = self.pop = None

    def install(self):
        self.thread = threading.get_ident()
        self.push, self.pop = _C._push_node_creation_hook, _C._pop_node_creation_hook
        self.patches = [Patch(_C, "_push_node_creation_hook", self._others_push),
                        Patch(_C, "_pop_node_creation_hook", self._others_pop)]
        self.foreign = 0
        self.resume()
        return None

    def _others_push(self, hook):
        if threading.get_ident() == self.thread:
            self.foreign += 1
        return self.push(hook)

    def _others_pop(self):
        if threading.get_ident() == self.thread and self.foreign > 0:
            self.foreign -= 1
        return self.pop()

    def pause(self) -> bool:
        was = self.live
        self.live = False
        if self.on and self.foreign == 0 and threading.get_ident() == self.thread:
            self.pop()
            self.on = False
        return was

    def resume(self) -> None:
        if threading.get_ident() != self.thread:
            return
        if not self.on:
            if self.foreign:
                return  # someone's hook is on top: ours would end up popped by them
            self.push(self.hook)
            self.on = True
        self.live = True

    def remove(self) -> bool:
        if self.push is None:
            return False
        self.live = False
        for p in reversed(self.patches):
            p.remove()
        self.patches = []
        if self.on:
            if self.foreign == 0:
                self.pop()
            else:
                log.warning("gradprobe: another node_creation_hook was still pushed above the probe's at exit; "
                            "left the probe's (now inert) in place")
            self.on = False
        self.push = self.pop = None
        return True

    def check_shadowed(self) -> None:
        pass  # seen per node: a node created under someone's saved-tensor hooks

    def op_names(self, grad_fn, start, end):
        return lambda i: type(grad_fn).__name__  # rows named by their own node already

    def on_data(self, t) -> None:
        self.aliases[t] = True

    def inplace_kind(self, row, t):
        base = t._base if t._is_view() else None
        return "data" if t in self.aliases or (base is not None and base in self.aliases) else "version"

    # --- the hook ------------------------------------------------------------------
    def _on_node(self, node) -> None:
        if not self.live:
            return
        try:
            with torch._C.DisableTorchFunction():
                self._node(node)
        except Exception as e:
            log.debug("gradprobe: node hook: %r", e)

    def _node(self, node) -> None:
        c = self.c
        tp = type(node)
        names = self.names.get(tp)
        if names is None:
            names = self.names[tp] = _saved_names(node)
        if names is False:
            return  # AccumulateGrad: no graph of its own
        bw, recompute = c.in_backward()
        if recompute:
            c.recompute(bw)
            return
        g = c.graph()
        rows = range(0)
        if names:
            top = _C._top_saved_tensors_default_hooks(False)
            if top is not None:
                c.shadowed_by(top[0])
            else:
                lg = c.log
                start = len(lg)
                op = lg.s(tp.__name__)
                for a in names:
                    v = getattr(node, a, None)
                    for x in (v if isinstance(v, (list, tuple)) else (v,)):
                        if isinstance(x, torch.Tensor) and not _wrapped_number(x):
                            c.record(x, op)
                rows = range(start, len(lg))
        s = Sentinel(c, g, rows)
        node.metadata[_KEY] = s
        if rows:
            node.register_hook(s.ran)


_SCALARS = (torch.int64, torch.float64, torch.complex128)


def _wrapped_number(t) -> bool:
    """A Python number PyTorch wrapped into a 0-dim tensor (`10 * x`): saved-tensor hooks never see
    those (PyTorch does not pack them), so neither do we."""
    return t.dim() == 0 and t.dtype in _SCALARS and not t.requires_grad and t.device.type == "cpu" and t.is_leaf


def _saved_names(node):
    if type(node).__name__ == "AccumulateGrad":
        return False
    out = []
    for a in dir(node):
        if a.startswith("_raw_saved_"):
            name = a[len("_raw"):]  # _raw_saved_x -> _saved_x
            out.append("saved_tensors" if name == "_saved_tensors" and not hasattr(node, name) else name)
    return tuple(out)
