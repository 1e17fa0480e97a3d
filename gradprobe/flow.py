"""Gradient flow per backward call: which tracked tensors received a gradient, and how big.

A hook on each tracked leaf notes that a gradient arrived. Big gradients are
measured right there, while they are hot in cache. Small ones whose `.grad`
was empty before (the usual case after zero_grad) are measured after the
backward from the final `.grad` (then exactly this backward's contribution),
all at once with foreach ops. Everything reaches the host in one transfer.
The hook never holds the gradient, so AccumulateGrad can still steal it and
training is unchanged.
"""

from __future__ import annotations

import math
import weakref

import torch


class BackwardCall:
    """State of one backward call while it runs, and what it found."""

    def __init__(self, index, step, site, api, retain_graph, create_graph, detail):
        self.index, self.step, self.site, self.api = index, step, site, api
        self.retain_graph, self.create_graph, self.detail = retain_graph, create_graph, detail
        self.arrived: list[int] = []  # tracked indices, in arrival order
        self.later: list[int] = []  # read .grad after the backward
        self.now: list[tuple] = []  # (index, [sum sq, min, max]) computed in the hook
        self.outs: list[tuple] = []  # (ModuleInfo, norm) gradient at module outputs
        self.considered: list[int] | None = None  # None: every tracked tensor
        self.t = 0.0
        self.duration = math.nan
        self.error: str | None = None
        self.root_tags = frozenset()


class Flow:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.handles: list = []
        self.last_out = (lambda: None, [])  # (weakref to the last hooked output, modules that returned it)

    # --- hooks ------------------------------------------------------------
    def hook_tensor(self, tracked) -> None:
        tensor = tracked.ref()
        if tensor is None or not tensor.requires_grad:
            return
        probe = self.probe

        def on_grad(g, t=tracked):
            bw = probe.current_bw
            if bw is None:
                return None
            bw.arrived.append(t.index)
            if not bw.detail:
                return None  # off detail steps only arrival is noted
            tensor = t.ref()
            if g.numel() >= _SMALL or bw.api == "autograd.grad" or g.is_sparse or tensor is None \
                    or tensor.grad is not None:
                bw.now.append((t.index, grad_stats([g])[0]))
            else:
                bw.later.append(t.index)
            return None

        self.handles.append(tensor.register_hook(on_grad))

    def hook_output(self, info, out) -> None:
        """Called from the forward hook: note the gradient arriving at a module's output."""
        probe = self.probe

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
                    bw = probe.current_bw
                    g = grads[nr] if isinstance(grads, tuple) else grads
                    if bw is not None and bw.detail and g is not None:
                        flat = g.reshape(-1)
                        sq = torch.dot(flat, flat) if flat.dtype in (torch.float32, torch.float64) \
                            else torch.linalg.vector_norm(flat.float()) ** 2
                        for i in infos:
                            bw.outs.append((i, sq))
                    return None

                # a node pre-hook costs half a tensor hook and lives and dies with the graph
                o.grad_fn.register_prehook(on_out_grad)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # --- after the backward ----------------------------------------------
    def measure(self, bw) -> tuple[dict, dict]:
        """{tracked index: (norm, maxabs)} and {ModuleInfo: norm} for this backward, one transfer per device."""
        tracked = self.probe.targets.tracked
        later = []
        for i in bw.later:
            tensor = tracked[i].ref()
            g = None if tensor is None else tensor.grad
            if g is not None:
                later.append((i, g))
        keys, parts = [], []  # ("p", index) owns 3 scalars [sum sq, min, max]; ("o", info) owns 1
        if later:
            for (i, _), (sq, lo, hi) in zip(later, grad_stats([g for _, g in later])):
                keys.append(("p", i))
                parts += (sq, lo, hi)
        for i, (sq, lo, hi) in bw.now:
            keys.append(("p", i))
            parts += (sq, lo, hi)
        for info, sq in bw.outs:
            keys.append(("o", info))
            parts.append(sq)
        values = _to_host(parts)
        stats: dict = {}
        outs: dict = {}
        pos = 0
        for what, key in keys:
            if what == "o":
                outs[key] = outs.get(key, 0.0) + values[pos]
                pos += 1
                continue
            sq, lo, hi = values[pos:pos + 3]
            pos += 3
            mx = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
            old = stats.get(key)
            stats[key] = (sq, mx) if old is None else (old[0] + sq, max(old[1], mx))
        return ({k: (math.sqrt(sq) if sq >= 0 else math.nan, mx) for k, (sq, mx) in stats.items()},
                {k: math.sqrt(v) for k, v in outs.items()})


_SMALL = 1 << 16  # below this, per-tensor kernel launches cost more than the data: use foreach ops


def grad_stats(grads: list) -> list[tuple]:
    """(sum of squares, min, max) per gradient, as 0-dim tensors on the gradients' devices.

    Big gradients: torch.dot (BLAS) and aminmax, one pass each. Small ones: three
    foreach calls for all of them. (torch._foreach_norm(ord=inf) takes a slow path
    on CPU, so max-abs comes from min and max.)
    """
    out: list = [None] * len(grads)
    small = []
    for k, g in enumerate(grads):
        if g.is_sparse:
            g = g.coalesce()._values()
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        if g.numel() == 0:
            z = g.new_zeros(())
            out[k] = (z, z, z)
        elif g.numel() < _SMALL and hasattr(torch, "_foreach_max"):
            small.append((k, g))
        else:
            flat = g.reshape(-1)
            lo, hi = torch.aminmax(flat)
            out[k] = (torch.dot(flat, flat), lo, hi)  # dot may overflow to inf: status comes from min/max
    if small:
        gs = [g for _, g in small]
        norms = torch._foreach_norm(gs)
        his = torch._foreach_max(gs)
        los = torch._foreach_max(torch._foreach_neg(gs))
        for (k, _), n, hi, nlo in zip(small, norms, his, los):
            out[k] = (n * n, -nlo, hi)
    return out


def _to_host(parts: list) -> list[float]:
    """All scalars to Python floats: one stack and one transfer per device."""
    if not parts:
        return []
    devices = {t.device for t in parts}
    values = [0.0] * len(parts)
    for d in devices:
        idx = [k for k, t in enumerate(parts) if t.device == d] if len(devices) > 1 else range(len(parts))
        for k, v in zip(idx, torch.stack([parts[k] for k in idx]).tolist()):  # stack promotes dtypes
            values[k] = v
    return values


def status_of(norm_max: tuple | None, requires_grad: bool) -> str:
    if not requires_grad:
        return "frozen"
    if norm_max is None:
        return "none"
    norm, mx = norm_max
    if math.isnan(mx) or math.isinf(mx) or math.isnan(norm):
        return "nonfinite"
    return "zero" if mx == 0 else "flow"


def rollup(statuses) -> str:
    """A module's status from its parameters' statuses."""
    s = set(statuses)
    for status in ("nonfinite", "flow", "zero", "none"):
        if status in s:
            return status
    return "frozen"
