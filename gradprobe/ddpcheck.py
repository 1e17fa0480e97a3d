"""`gp.ddp_check(model, batch)`: before launching DDP, one forward/backward in this process predicts the two
errors DDP raises most: parameters without a gradient ("Expected to have finished reduction in the prior
iteration", with find_unused_parameters=False) and parameters whose gradient arrives twice in one backward
because a reentrant `checkpoint(...)` re-runs them ("Expected to mark a variable ready only once").

Runs under a Probe (every=1) for statuses, causes and lines; counts each parameter's gradient arrivals with a
tensor hook and notes the reentrant checkpoint being back-propagated. Parameters, their `.grad`, buffers and
the RNG state are restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture.sites import site
from .diagnose.distributed import ERR_TWICE, ddp_consequence, unused_rows
from .diagnose.finding import Finding


@dataclass
class DDPCheckResult:
    findings: list = field(default_factory=list)
    unused: list = field(default_factory=list)  # parameters no gradient reached
    ready_twice: list = field(default_factory=list)  # parameters whose gradient arrived more than once

    @property
    def ok(self) -> bool:
        return not self.findings

    def __str__(self) -> str:
        if self.ok:
            return ("ddp_check: OK: every trainable parameter got exactly one gradient; DDP (default flags) "
                    "should not raise the unused-parameter or marked-ready-twice errors.")
        return "ddp_check found:\n" + "\n".join(f"- {f}" for f in self.findings)

    __repr__ = __str__


class _CheckpointSites:
    """While installed: which reentrant checkpoint call (user line) is being back-propagated."""

    def __init__(self) -> None:
        from torch.utils import checkpoint as ck
        self.cls = getattr(ck, "CheckpointFunction", None)
        self.current: str | None = None
        self.orig: dict = {}

    def __enter__(self):
        cls = self.cls
        if cls is None:
            return self
        self.orig = {k: cls.__dict__[k] for k in ("forward", "backward")}
        fwd, bwd = cls.forward, cls.backward

        def forward(ctx, *args):
            ctx._gradprobe_site = site(2)
            return fwd(ctx, *args)

        def backward(ctx, *grads):
            outer, self.current = self.current, getattr(ctx, "_gradprobe_site", None)
            try:
                return bwd(ctx, *grads)
            finally:
                self.current = outer

        cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self.orig.items():
            setattr(self.cls, k, v)


def _loss_of(out, loss_fn):
    if loss_fn is not None:
        return loss_fn(out)
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.sum()
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        loss = out[0]
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"gradprobe.ddp_check: cannot make a loss from the model's output ({type(out).__name__}); "
                        "pass loss_fn=lambda out: ... returning a scalar tensor")
    return loss if loss.dim() == 0 else loss.sum()


def ddp_check(model, batch, loss_fn=None) -> DDPCheckResult:
    """One forward/backward of `model` on `batch` (a tensor, a tuple of positional arguments or a dict of
    keyword arguments) in this process, without DDP; `loss_fn(output)` makes the scalar loss (default: the
    output summed, or its `.loss`). Returns what DDP would raise, naming parameters, cause and line."""
    from .capture.dist import unwrap
    from .probe import Probe

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gradprobe.ddp_check: model must be an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved_grads = [p.grad for _, p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.random.get_rng_state()
    counts: dict = {n: [] for n, _ in params}
    order: list = []  # names in the order their gradients arrived
    handles = []
    sites = _CheckpointSites()
    try:
        for n, p in params:
            p.grad = None
            handles.append(p.register_hook(lambda g, n=n: _arrived(n, counts, order, sites.current)))
        with sites, Probe(model, every=1, track=("grads", "cuts")) as probe:
            if isinstance(batch, dict):
                out = model(**batch)
            elif isinstance(batch, (tuple, list)):
                out = model(*batch)
            else:
                out = model(batch)
            _loss_of(out, loss_fn).backward()
        tables = probe.to_pandas()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for (_, p), g in zip(params, saved_grads):
                p.grad = g
            for b, v in saved_buffers:
                b.copy_(v)
        torch.random.set_rng_state(rng)
    return _result(tables, counts, order)


def _arrived(name: str, counts: dict, order: list, where) -> None:
    counts[name].append(where)
    order.append(name)


def _silent(name: str, order: list, counts: dict) -> bool:
    """Whether every parameter had its gradient before `name`'s second one: DDP's reducer has then finished
    the iteration (its finalizer runs in the first reentrant backward) and ignores the second gradient."""
    second = [k for k, n in enumerate(order) if n == name][1]
    return set(order[:second]) >= set(counts)


def _result(tables: dict, counts: dict, order: list) -> DDPCheckResult:
    res = DDPCheckResult()
    for r in unused_rows(tables, ddp_consequence(None, None), under="", shown=None):
        res.unused += r["params"]
        res.findings.append(Finding(kind=r["kind"], severity=r["severity"], site=r["site"], params=r["params"],
                                    message=r["message"]))
    twice = {n: s for n, s in counts.items() if len(s) > 1}
    by_sites: dict = {}
    for n, s in twice.items():
        by_sites.setdefault(tuple(sorted(set(x or "outside any checkpoint" for x in s))), []).append(n)
    for where, names in by_sites.items():
        res.ready_twice += names
        k = max(len(counts[n]) for n in names)
        inside = [w for w in where if w != "outside any checkpoint"]
        if any(_silent(n, order, counts) for n in names):
            what = ("DDP ignores the later ones without an error: every other gradient had already arrived, so "
                    "its reducer has finished the iteration, and the ranks' gradients silently diverge (not "
                    f"all-reduced). Were a gradient still pending, DDP would raise RuntimeError \"{ERR_TWICE}\"")
        else:
            what = f"DDP raises RuntimeError \"{ERR_TWICE}\" (parameter marked ready twice)"
        res.findings.append(Finding(
            kind="ddp_ready_twice", severity="error", site=inside[0] if inside else None, params=names,
            message=f"{', '.join(f'`{n}`' for n in names)} receive their gradient {k} times in one backward: "
                    f"reentrant checkpoint(...) at {' and '.join(where)} back-propagates its recomputed segment "
                    f"separately, so each use accumulates on its own. {what}. "
                    "Fix: checkpoint(..., use_reentrant=False), or "
                    "DDP(..., static_graph=True) when the graph is the same every iteration."))
    return res
