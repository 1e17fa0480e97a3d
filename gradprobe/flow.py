"""Gradient flow per backward call: which tracked tensors received a gradient, and how big.

A hook on each tracked leaf notes that a gradient arrived. When `.grad` was
empty before (the usual case after zero_grad), the contribution of this
backward is exactly the final `.grad`, so its norms are computed after the
backward, batched with `torch._foreach_norm` and brought to the host in one
transfer; otherwise (accumulation, autograd.grad, sparse) the hook computes
the norms of the incoming gradient right away. The hook never holds the
gradient, so AccumulateGrad can still steal it and training is unchanged.
"""

from __future__ import annotations

import math

import torch

INF = float("inf")


class BackwardCall:
    """State of one backward call while it runs, and what it found."""

    def __init__(self, index, step, site, api, retain_graph, create_graph, detail):
        self.index, self.step, self.site, self.api = index, step, site, api
        self.retain_graph, self.create_graph, self.detail = retain_graph, create_graph, detail
        self.arrived: list[int] = []  # tracked indices, in arrival order
        self.later: list[int] = []  # read .grad after the backward
        self.now: list[tuple] = []  # (index, norm, maxabs) computed in the hook
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
            tensor = t.ref()
            if bw.api == "autograd.grad" or g.is_sparse or tensor is None or tensor.grad is not None:
                v = g.coalesce()._values() if g.is_sparse else g
                bw.now.append((t.index, torch.linalg.vector_norm(v), torch.linalg.vector_norm(v, INF)))
            else:
                bw.later.append(t.index)
            return None

        self.handles.append(tensor.register_hook(on_grad))

    def hook_output(self, info, out) -> None:
        """Called from the forward hook: note the gradient arriving at a module's output."""
        probe = self.probe

        def on_out_grad(g, info=info):
            bw = probe.current_bw
            if bw is not None and bw.detail:
                bw.outs.append((info, torch.linalg.vector_norm(g)))
            return None

        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(on_out_grad)  # lives and dies with the graph

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # --- after the backward ----------------------------------------------
    def measure(self, bw) -> tuple[dict, dict]:
        """{tracked index: (norm, maxabs)} and {ModuleInfo: norm} for this backward, one transfer per device."""
        tracked = self.probe.targets.tracked
        idx, tensors = [], []
        later = [i for i in bw.later if tracked[i].ref() is not None and tracked[i].ref().grad is not None]
        if later:
            grads = [tracked[i].ref().grad for i in later]
            norms = torch._foreach_norm(grads, 2)
            maxs = torch._foreach_norm(grads, INF)
            for i, n, m in zip(later, norms, maxs):
                idx.append(("p", i))
                tensors.append(n)
                idx.append(("m", i))
                tensors.append(m)
        for i, n, m in bw.now:
            idx.append(("p", i))
            tensors.append(n)
            idx.append(("m", i))
            tensors.append(m)
        for info, n in bw.outs:
            idx.append(("o", info))
            tensors.append(n)
        by_device: dict = {}
        for k, t in zip(idx, tensors):
            keys, ts = by_device.setdefault(t.device, ([], []))
            keys.append(k)
            ts.append(t)
        sq: dict = {}
        mx: dict = {}
        outs: dict = {}
        for keys, ts in by_device.values():
            for (what, key), v in zip(keys, torch.stack([t.float() for t in ts]).tolist()):
                if what == "p":
                    sq[key] = sq.get(key, 0.0) + v * v
                elif what == "m":
                    mx[key] = v if math.isnan(v) or v > mx.get(key, -1.0) else mx[key]
                else:
                    outs[key] = outs.get(key, 0.0) + v * v
        stats = {k: (math.sqrt(v), mx[k]) for k, v in sq.items()}
        return stats, {k: math.sqrt(v) for k, v in outs.items()}


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
