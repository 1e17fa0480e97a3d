"""Where the first NaN/Inf came from: a targeted re-capture of the iteration after a non-finite gradient.

Nothing runs while training is finite. When a detail backward finds a non-finite gradient
(`nonfinite_seen`), the *next* forward is armed (the next step, or the same step when the user skipped
the optimizer step): from it until its backward, a light torch-function mode checks every op output
that joins the graph (`torch.isfinite(t).all()`, one sync per op, in that iteration only) and records the first forward op producing NaN/Inf with its module and the user's
`file:line`. The same op's autograd node gets a post-hook that, in that step's backward, records
the first node turning finite output-gradients into non-finite input-gradients. Nodes met only
as inputs (a custom `autograd.Function`, which PyTorch does not dispatch to torch-function modes)
are hooked when consumed, named by their node and the consuming line. Everything comes off when
that iteration ends; rows are plain strings (no tensor kept). At most MAX_CAPTURES re-captures a run;
none after a backward of a GradScaler-scaled loss (its overflow steps are skipped, info, not errors).
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .mode import _outputs as _outs, _tensors as _args
from .sites import site

log = logging.getLogger("gradprobe")

MAX_CAPTURES = 3
_KEY = "gradprobe_numerics"  # node.metadata key: marks a node as hooked by this capture


def _checkable(t) -> bool:
    return type(t) in (Tensor, torch.nn.Parameter) and (t.is_floating_point() or t.is_complex())


def _finite(ts) -> bool:
    for t in ts:
        if t is not None and isinstance(t, Tensor) and _checkable(t) and t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return True


def _what(ts) -> str:
    for t in ts:
        if t is not None and isinstance(t, Tensor) and _checkable(t) and t.numel() and bool(torch.isnan(t).any()):
            return "nan"
    return "inf"


class _CheckMode(TorchFunctionMode):
    def __init__(self, numerics) -> None:
        super().__init__()
        self.n = numerics
        self.checking = True  # False: inert until it can leave the stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.checking and not self.n.c.busy and torch.is_grad_enabled():
            try:
                with torch._C.DisableTorchFunction():
                    self.n.after_op(func, args, kwargs, out)
            except Exception as e:  # never break training because of the probe
                log.debug("gradprobe: numerics check failed: %r", e)
        return out


class Numerics:
    def __init__(self, capture) -> None:
        self.c = capture
        self.armed: int | None = None  # the step to re-capture
        self.step: int | None = None  # the step being re-captured now
        self.captures = 0
        self.mode: _CheckMode | None = None  # on the torch-function stack (maybe inert)
        self.found_forward = False
        self.found_backward = False
        self.backward_seen = False  # the capture under way has reached its backward
        self.lock = threading.Lock()

    # --- arming ------------------------------------------------------------------
    def nonfinite_seen(self, step: int) -> None:
        """A detail backward of `step` found non-finite gradients: re-capture the next forward and backward."""
        if (self.armed is not None or self.step is not None or self.captures >= MAX_CAPTURES
                or self.found_forward or self.found_backward or self.c.compiled):
            return
        if self.c.amp.scale_tensor() is not None:  # a GradScaler'd loss: overflow is how it finds its scale
            return
        self.armed = step

    def graph_activity(self) -> None:
        """A forward is building a graph: start an armed capture, or end one whose backward has run."""
        if self.step is not None:
            if self.backward_seen:
                self._finish()
        elif self.armed is not None and self._on_thread() and not self.c.compiled:
            self.armed = None
            self._begin(self.c.clock.step)
        elif self.mode is not None:
            self.try_off()

    def step_begins(self, step: int) -> None:
        """The clock moved to `step`: a capture under way ends with its step."""
        if self.step is not None and self.backward_seen:
            self._finish()
        elif self.mode is not None and self.step is None:
            self.try_off()

    def _on_thread(self) -> bool:
        t = self.c.thread
        return t is None or threading.get_ident() == t

    def _begin(self, step: int) -> None:
        self.step = step
        self.backward_seen = False
        self.captures += 1
        self.mode = _CheckMode(self)
        torch._C._push_on_torch_function_stack(self.mode)

    def _finish(self) -> None:
        self.step = None
        if self.mode is not None:
            self.mode.checking = False
        self.try_off()

    def forward_done(self) -> None:
        """A backward begins: forward checks of this capture are over (node hooks take over)."""
        if self.mode is not None:
            self.mode.checking = False
        if self.step is not None:
            self.backward_seen = True

    def try_off(self) -> None:
        """Take the mode off the stack wherever it sits (modes above it go back in order)."""
        m = self.mode
        if m is None or m.checking or not self._on_thread():
            return
        n = torch._C._len_torch_function_stack()
        stack = [torch._C._get_function_stack_at(k) for k in range(n)]
        if not any(s is m for s in stack):
            return  # inside its own handler (popped for now): later
        above = []
        while True:
            top = torch._C._pop_torch_function_stack()
            if top is m:
                break
            above.append(top)
        for s in reversed(above):
            torch._C._push_on_torch_function_stack(s)
        self.mode = None

    def remove(self) -> None:
        """Leaving the probe: off now."""
        self.armed = None
        self.step = None
        if self.mode is not None:
            self.mode.checking = False
            self.try_off()
            self.mode = None

    # --- checks --------------------------------------------------------------------
    def after_op(self, func, args, kwargs, out) -> None:
        outs = [o for o in _outs(out) if o.requires_grad and o.grad_fn is not None and _checkable(o)]
        if not outs:
            return
        step = self.captures
        module, kind = self._module()
        op = getattr(func, "__name__", None) or str(func)
        where = None
        seen = set()
        for t in _args(args, kwargs):  # nodes PyTorch made without dispatching here (custom Functions)
            node = t.grad_fn
            if node is not None and id(node) not in seen and _KEY not in node.metadata:
                seen.add(id(node))
                where = where or site(1)
                self._hook(node, step, (module, kind), node.name(), where)
        for o in outs:
            node = o.grad_fn
            if id(node) not in seen and _KEY not in node.metadata:
                seen.add(id(node))
                where = where or site(1)
                self._hook(node, step, (module, kind), op, where)
        if self.found_forward:
            return
        with torch.no_grad():
            if _finite(outs):
                return
            inputs = "finite" if _finite(_args(args, kwargs)) else "nonfinite"
            what = _what(outs)
        self.found_forward = True
        self._record(self.step, "forward", (module, kind), op, where or site(1), what, inputs)

    def _hook(self, node, step, module, op, where) -> None:
        node.metadata[_KEY] = (module, op, where)
        numerics = self

        def post(grad_inputs, grad_outputs):
            if numerics.found_backward or numerics.found_forward or numerics.step is None or numerics.captures != step:
                return None
            try:
                with torch.no_grad(), torch._C.DisableTorchFunction():
                    if _finite(grad_inputs) or not _finite(grad_outputs):
                        return None
                    what = _what(grad_inputs)
                numerics.found_backward = True
                numerics._record(numerics.step, "backward", module, label, where, what, "finite")
            except Exception as e:
                log.debug("gradprobe: numerics backward check failed: %r", e)
            return None

        node_name = node.name()
        label = node_name if op == node_name else f"{op} ({node_name})"
        node.register_hook(post)

    def _module(self):
        """(name, class name) of the innermost tracked module running now."""
        for f in reversed(self.c.modules.frames):
            if f.info is not None:
                return f.info.name, type(f.module).__name__
        return None, None

    def _record(self, step, phase, module, op, where, what, inputs) -> None:
        with self.lock:
            self.c.store.add("numerics", step=step, phase=phase, module=module[0], type=module[1], op=op,
                             site=where, what=what, inputs=inputs)
