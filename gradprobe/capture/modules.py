"""Which module is running: global forward hooks (installed on detail steps only).

They keep the stack of tracked modules running now (for cuts' and saved tensors' module),
note which modules ran in the step (`not_used` vs `not_in_graph`), discover top-level
modules when the probe observes everything, hook module outputs for their gradient norm,
and at a module called under no_grad they record the call as one cut and step the
torch-function mode aside so that PyTorch's fused fast paths run as without the probe.
"""

from __future__ import annotations

import torch

from .graph import tensors_in
from .sites import checkpoint_call, in_torch_internals, site


MAX_DEPTH = 48  # hooked nesting depth: a hook adds a Python frame per level (deeper ones count for their ancestor)


class _Frame:
    __slots__ = ("module", "info", "grad", "popped")

    def __init__(self, module, info, grad, popped):
        self.module, self.info, self.grad, self.popped = module, info, grad, popped


class ModuleStack:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.frames: list[_Frame] = []
        self.depth = 0  # tracked modules among the frames
        self.ran: set[str] = set()  # modules whose forward ran in this step

    def install(self) -> list:
        """Hooks on the tracked modules; global hooks only when the probe observes everything (model=None).

        Per-module hooks leave `nn.Module`'s global-hook check false, which torch.compile'd modules
        warn about, and cost nothing for modules the probe does not track.
        """
        if self.probe.discover:
            nn = torch.nn.modules.module
            return [nn.register_module_forward_pre_hook(self._pre),
                    nn.register_module_forward_hook(self._post, always_call=True)]
        handles = []
        for info in self.probe.targets.modules:
            m = info.ref()
            if m is not None and info.depth <= MAX_DEPTH:
                handles.append(m.register_forward_pre_hook(self._pre))
                handles.append(m.register_forward_hook(self._post, always_call=True))
        return handles

    def current(self) -> str | None:
        for f in reversed(self.frames):
            if f.info is not None:
                return f.info.name
        return None

    def tracked_depth(self) -> int:
        return self.depth

    def _pre(self, module, args) -> None:
        if torch.compiler.is_compiling():  # first: dynamo folds it and traces nothing of ours
            return
        p = self.probe
        if p.busy:
            return
        if p.instruments.want_off:
            p.instruments.try_off()
            return
        p.instruments.resume_mode()  # a forward inside optimizer.step (LBFGS closure) is user code again
        targets = p.targets
        info = targets.info_of(module)
        if type(module).__name__ == "OptimizedModule":  # a torch.compile'd module (model=None)
            p._compiled()
            return
        if info is None and p.discover and not self.tracked_depth():
            targets.discover(module)
            info = targets.info_of(module)
        grad = torch.is_grad_enabled()
        parent_grad = self.frames[-1].grad if self.frames else True
        popped = False
        if not grad:
            popped = p.instruments.mode_aside()  # fused fast paths check has_torch_function: no mode under no_grad calls
            if parent_grad and info is not None and info.params:
                self._no_grad_call(module, info)
        elif info is not None:
            p.graph_activity()
        if info is not None:
            if not self.depth:
                if p.memory is not None:
                    p.memory.on_forward(module, args)
            self.ran.add(info.name)
        self.frames.append(_Frame(module, info, grad, popped))
        self.depth += info is not None

    def _post(self, module, args, out) -> None:
        if torch.compiler.is_compiling() or not self.frames or self.frames[-1].module is not module:
            return
        f = self.frames.pop()
        self.depth -= f.info is not None
        if f.popped:
            self.probe.instruments.resume_mode()
        info = f.info
        p = self.probe
        if info is not None and info.params and p.detail and p.grads and f.grad and not p.busy:
            with torch._C.DisableTorchFunction():  # our attribute reads need not pass through the mode
                p.flow.hook_output(info, out if isinstance(out, torch.Tensor) else tuple(tensors_in(out, 64)))

    def _no_grad_call(self, module, info) -> None:
        """A tracked module with trainable parameters called where no graph is built: one cut."""
        p = self.probe
        trainable = [t for t in (p.targets.tracked[i] for i in info.params) if _requires_grad(t)]
        if not trainable:
            return
        ckpt = checkpoint_call(3)
        if ckpt is not None:
            where, inputs = ckpt
            if any(t.requires_grad for t in inputs):
                return  # reentrant checkpoint recomputes this with grad in backward: not a cut
            p.record_cut("reentrant_checkpoint", "checkpoint", where, frozenset(t.name for t in trainable),
                         module=info.name)
            return
        if in_torch_internals(3):
            return
        p.record_cut("no_grad", f"{info.type}.forward", site(3), frozenset(t.name for t in trainable),
                     module=info.name)

    def end_step(self) -> None:
        self.ran.clear()

    def clear(self) -> None:
        self.frames.clear()
        self.depth = 0


def _requires_grad(tracked) -> bool:
    t = tracked.ref()
    return t is not None and t.requires_grad
