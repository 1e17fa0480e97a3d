"""Gradient arrival (every step) and gradient norms (detail steps).

A hook on each tracked leaf notes that a gradient arrived in the running backward; it never
holds or reads the gradient, so AccumulateGrad can still steal it and training is unchanged.
Norms follow one policy, whatever the tensor's size: the gradient the optimizer will step
with from that backward, i.e. `.grad` right after it (user hooks, accumulation and DDP's
all-reduce included); for `torch.autograd.grad`, the gradient it returned. All norms of a
backward reach the host in one transfer per device.
"""

from __future__ import annotations

import math
import weakref

import torch

from . import gradstats


class Flow:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.handles: dict = {}  # tracked index -> hook handle; ("fsdp2", index): on FSDP2 unsharded (dist.py)
        self.unhooked: list = []  # tracked entries not requiring grad when last looked at
        self.last_out = (lambda: None, [])  # (weakref to the last hooked output, modules that returned it)

    # --- arrival hooks ------------------------------------------------------
    def hook(self, tracked) -> None:
        tensor = tracked.ref()
        if tensor is None or tracked.index in self.handles:
            return
        if not tensor.requires_grad:
            self.unhooked.append(tracked)  # frozen now; hooked once it requires grad (unfreezing)
            return
        current = self.probe.backwards.current
        arrived = _Arrival(current, tracked.index)
        self.handles[tracked.index] = tensor.register_hook(arrived)

    def refresh(self) -> None:
        """Hook tensors that started requiring grad since (progressive unfreezing)."""
        if self.unhooked:
            waiting, self.unhooked = self.unhooked, []
            for t in waiting:
                if t.ref() is not None:
                    self.hook(t)

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()
        self.unhooked.clear()
        self.last_out = (lambda: None, [])

    # --- module outputs (detail steps) ---------------------------------------
    def hook_output(self, info, out) -> None:
        """From the forward hook: note the gradient arriving at a module's output."""
        current = self.probe.backwards.current
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            # a leaf output (a module returning a parameter) has no node: its own hook covers it
            if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                last, infos = self.last_out
                if last() is o:  # a container returning its child's output: one hook serves both
                    infos.append(info)
                    continue
                infos = [info]
                self.last_out = (weakref.ref(o), infos)

                def on_out_grad(grads, infos=infos, nr=o.output_nr):
                    bw = current()
                    g = grads[nr] if isinstance(grads, tuple) else grads
                    if bw is not None and bw.detail and g is not None:
                        with torch.no_grad():
                            sq = gradstats.sq_norm(g)
                        for i in infos:
                            bw.outs.append((i, sq))
                    return None

                # a node pre-hook costs half a tensor hook and lives and dies with the graph
                o.grad_fn.register_prehook(on_out_grad)

    # --- after the backward ----------------------------------------------------
    def measure(self, bw, scale=None) -> tuple[dict, dict]:
        """{tracked index: (norm, status)} for what arrived, and {ModuleInfo: norm}; one transfer per device."""
        tracked = self.probe.targets.tracked
        idx, grads = [], []
        if bw.api == "autograd.grad":
            by_index = self._returned(bw)
            for i in dict.fromkeys(bw.arrived):
                idx.append(i)
                grads.append(by_index.get(i))
        else:
            unmeasured = self.probe.dist.unmeasured  # FSDP2 without gradient sync: arrived, nothing to read
            for i in dict.fromkeys(bw.arrived):
                t = tracked[i].ref()
                idx.append(i)
                # None: taken by a hook (optimizer in backward), or not measurable (FSDP2 without sync)
                grads.append(None if t is None or i in unmeasured else t.grad)
        with torch.no_grad():
            stats = dict(zip(idx, gradstats.measure(grads, scale)))
            outs: dict = {}
            if bw.outs:
                sums: dict = {}
                for info, sq in bw.outs:
                    sums[info] = sums[info] + sq if info in sums else sq
                keys = list(sums)
                values = gradstats.to_host([sums[k] for k in keys])
                outs = {k: math.sqrt(v) if v >= 0 else math.nan for k, v in zip(keys, values)}
        return stats, outs

    def _returned(self, bw) -> dict:
        """autograd.grad: tracked index -> the gradient returned for it."""
        by_tensor = self.probe.targets.by_tensor
        out = {}
        if bw.result is None or bw.inputs is None:
            return out
        for t, g in zip(bw.inputs, bw.result):
            tr = by_tensor.get(t)
            if tr is not None and g is not None:
                out[tr.index] = g
        return out


class _Arrival:
    """The tensor hook: appends the tracked index to the running backward (slots: cheap to call)."""

    __slots__ = ("current", "index")

    def __init__(self, current, index):
        self.current, self.index = current, index

    def __call__(self, grad):
        bw = self.current()
        if bw is not None:
            bw.arrived.append(self.index)
        return None
