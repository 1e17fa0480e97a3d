"""Gradient statistics: one norm per gradient, with few kernels and one transfer per device.

Status comes from the norm alone: finite and > 0 is `flow`; 0 or non-finite is re-checked
exactly on those few tensors only (an fp32 sum of squares can underflow to 0 for tiny values
or overflow to inf for huge ones), so max-abs passes are paid only where needed. Half
precision is reduced in fp32 by the norm kernel itself (no full fp32 copy); complex
gradients have the norm of their complex values.
"""

from __future__ import annotations

import math

import torch

from .dist import local_grad

FLOW, ZERO, NONFINITE = "flow", "zero", "nonfinite"
_HALF = (torch.float16, torch.bfloat16)


def _dense(g):
    """Values to measure: a sparse gradient's values, a DTensor's local shard (None: this rank holds none)."""
    if g.is_sparse:
        return g.coalesce()._values()
    return g if type(g) is torch.Tensor else local_grad(g)


def measure(grads: list, scale=None) -> list[tuple[float, str]]:
    """(norm, status) per gradient (a tensor, or None for "arrived but not measurable": NaN, flow).

    `scale`: a GradScaler scale tensor; norms are divided by it (they are of the unscaled gradient).
    """
    out: list = [(math.nan, FLOW)] * len(grads)
    groups: dict = {}
    for k, g in enumerate(grads):
        if g is None:
            continue
        g = _dense(g)
        if g is None:
            continue
        groups.setdefault((g.device, g.dtype), []).append((k, g))
    parts, keys = [], []
    for (device, dtype), items in groups.items():
        ts = [g for _, g in items]
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32) if dtype in _HALF else torch._foreach_norm(ts)
        parts += norms
        keys += [k for k, _ in items]
    if scale is not None and parts:
        parts.append(scale.reshape(()).float())
    values = to_host(parts)
    s = values.pop() if scale is not None and parts else 1.0
    for k, v in zip(keys, values):
        if v > 0 and math.isfinite(v):
            out[k] = (v / s, FLOW)
        else:
            out[k] = _recheck(_dense(grads[k]), s)
    return out


def _recheck(g, s: float) -> tuple[float, str]:
    """Exact status for a gradient whose fp32 norm came out 0, inf or NaN."""
    if g.numel() == 0 or not bool(g.any()):
        return 0.0, ZERO
    if not bool(torch.isfinite(g).all()):
        return math.nan if bool(torch.isnan(g).any()) else math.inf, NONFINITE
    v = float(torch.linalg.vector_norm(g.to(torch.complex128) if g.is_complex() else g.double()))
    return v / s, FLOW


def to_host(parts: list) -> list[float]:
    """Scalars to Python floats: one stack and one transfer per device."""
    if not parts:
        return []
    by_device: dict = {}
    for k, t in enumerate(parts):
        by_device.setdefault(t.device, []).append(k)
    values = [0.0] * len(parts)
    for idx in by_device.values():
        for k, v in zip(idx, torch.stack([parts[k] for k in idx]).tolist()):  # stack promotes dtypes
            values[k] = v
    return values


def sq_norm(g):
    """Squared norm of a module-output gradient, as a 0-dim tensor (no sync)."""
    g = _dense(g)
    if g.dtype in _HALF:
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
    else:
        n = torch.linalg.vector_norm(g)
    return n * n


def rollup(statuses) -> str:
    """A module's status from its parameters' statuses."""
    s = set(statuses)
    for status in (NONFINITE, FLOW, ZERO, "none"):
        if status in s:
            return status
    return "frozen"
