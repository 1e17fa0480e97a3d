"""Run one training function twice, without and with a probe, and assert every bit is the same.

`train(wrap)` builds its model, optimizer and data from the global seed, calls `wrap(model)`
to get the context its loop runs under (a `nullcontext` the first time, a `gp.Probe` the
second) and returns what it wants compared: a dict of tensors, numbers and nested
lists/dicts of them (outputs, losses). `collect(...)` adds the usual state (parameters,
buffers, gradients, optimizer state). RNG states and warnings are compared as well.
"""

from __future__ import annotations

import contextlib
import random
import warnings

import torch

import gradprobe as gp


def collect(model=None, opt=None, **extra) -> dict:
    """Parameters, buffers, gradients and optimizer state, detached copies."""
    out = dict(extra)
    if model is not None:
        out["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        out["buffers"] = {k: v.detach().clone() for k, v in model.named_buffers()}
        out["grads"] = {k: None if v.grad is None else v.grad.detach().clone()
                        for k, v in model.named_parameters()}
    if opt is not None:
        opts = opt if isinstance(opt, (list, tuple)) else [opt]
        out["optim"] = [o.state_dict() for o in opts]
    return out


def assert_same(a, b, path="result") -> None:
    """Bit-identical: same types, shapes, dtypes, values (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.is_sparse:
            a, b = a.coalesce().to_dense(), b.coalesce().to_dense()
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.dtype.is_floating_point:
            same = torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) and torch.equal(
                a.isnan(), b.isnan())
        else:
            same = torch.equal(a, b)
        assert same, f"{path}: values differ (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, f"{path}: nan vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _run(train, wrap):
    torch.manual_seed(0)
    random.seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(wrap)
    rng = torch.get_rng_state()
    return result, rng, [(w.category.__name__, str(w.message)) for w in caught]


def check_identical(train, **probe_kwargs):
    """Run `train` without and with `gp.Probe(model, **probe_kwargs)`; assert identical; return the probe.

    `probe_kwargs` may hold `model=None` to observe everything instead of the model passed to wrap.
    """
    probes = []

    def plain(model=None):
        return contextlib.nullcontext()

    def probed(model=None):
        kw = dict(probe_kwargs)
        target = kw.pop("model", model)
        p = gp.Probe(target, **kw)
        probes.append(p)
        return p

    ref, ref_rng, ref_warn = _run(train, plain)
    got, got_rng, got_warn = _run(train, probed)
    assert_same(ref, got)
    assert torch.equal(ref_rng, got_rng), "the probe changed the RNG state"
    assert got_warn == ref_warn, f"warnings differ with the probe: {got_warn} vs {ref_warn}"
    assert probes, "train() never called wrap(model)"
    return probes[-1]
