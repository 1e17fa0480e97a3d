"""compare_no_grad: what torch.no_grad() saves counts only storages that exist because of the graph
(never parameters, buffers or inputs), checked by hand and against an independent count on
resnet18; the CPU profiler measures memory; time is never a negative percentage."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.clean import hooks_top
from gradprobe.compare import Comparison, _faster

F32 = 4  # bytes per float32


def saving(c) -> int:
    """The exact bytes of the sentence 'torch.no_grad() saves ... per forward'."""
    m = re.search(r"torch\.no_grad\(\) saves (?:[\d.]+ \w+ \()?([\d,]+) bytes\)? per forward", str(c))
    assert m, str(c)
    return int(m.group(1).replace(",", ""))



def compare_quietly(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gp.compare_no_grad(*args, **kwargs)
    assert [str(w.message) for w in caught] == []
    assert hooks_top() is None  # its saved_tensors_hooks are gone
    return c


def test_mlp_activation_bytes_are_the_hidden_activations_by_hand():
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 6)
    df = compare_quietly(net, x, repeat=1).to_pandas().set_index("mode")
    g = df.loc["grad"]
    hidden = (4 * 16 + 4 * 8) * F32  # the two ReLU outputs (each also the next Linear's saved input)
    assert g["activation_bytes"] == hidden == 384
    assert g["param_bytes"] == (16 * 8 + 8 * 3) * F32  # W2.t(), W3.t(): views of the weights
    assert g["input_bytes"] == 4 * 6 * F32  # x, for W1's gradient
    assert g["cast_bytes"] == 0
    assert g["saved_bytes"] == g["activation_bytes"] + g["param_bytes"] + g["input_bytes"]
    for mode in ("no_grad", "inference_mode"):
        assert df.loc[mode, ["saved_bytes", "activation_bytes", "param_bytes", "input_bytes"]].sum() == 0


def test_mlp_saving_never_contains_parameters_or_inputs():
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 6, requires_grad=True)  # now W1.t() is saved too, and x stays an input
    c = compare_quietly(net, x, repeat=1)
    g = c.to_pandas().set_index("mode").loc["grad"]
    assert g["param_bytes"] == (6 * 16 + 16 * 8 + 8 * 3) * F32
    assert g["input_bytes"] == 4 * 6 * F32
    assert saving(c) == g["activation_bytes"] == (4 * 16 + 4 * 8) * F32


def test_batchnorm_buffers_are_not_savings():
    net = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 2)).train()
    x = torch.randn(8, 6)
    bn = net[1]
    buffers = {bn.running_mean.untyped_storage().data_ptr(), bn.running_var.untyped_storage().data_ptr()}
    saved_ptrs = []

    def pack(t):
        saved_ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    assert buffers <= set(saved_ptrs)  # autograd does save the running statistics in train mode

    c = compare_quietly(net, x, repeat=1)
    g = c.to_pandas().set_index("mode").loc["grad"]
    # linear output (BN's input), ReLU output, BN's save_mean and save_invstd
    assert g["activation_bytes"] == (8 * 10 + 8 * 10 + 10 + 10) * F32
    # BN weight, running_mean, running_var, W2.t()
    assert g["param_bytes"] == (10 + 10 + 10 + 10 * 2) * F32
    assert saving(c) == g["activation_bytes"]


def test_resnet18_saving_is_the_activations_and_cpu_profiler_measures():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().train()
    x = torch.randn(8, 3, 64, 64)

    # independent count: every storage autograd saves, once, less parameter/buffer/input storages
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    seen: dict = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    expected = sum(n for p, n in seen.items() if p not in fixed)
    fixed_saved = sum(n for p, n in seen.items() if p in fixed)
    del out

    c = compare_quietly(model, x, repeat=1)
    df = c.to_pandas().set_index("mode")
    g = df.loc["grad"]
    stated = saving(c)
    assert stated == g["activation_bytes"] + g["cast_bytes"]
    assert abs(stated - expected) <= 0.05 * expected
    assert g["param_bytes"] + g["input_bytes"] == fixed_saved  # every parameter storage is out of it
    assert stated + fixed_saved == g["saved_bytes"]
    assert g["param_bytes"] > stated  # what the old sentence wrongly included

    assert (df["peak_source"] == "cpu_profiler").all()
    assert g["peak_bytes"] > 0 and g["held_bytes"] > 0
    # measured independently by the allocator: what the graph holds after the forward
    held = g["held_bytes"] - df.loc["no_grad", "held_bytes"]
    assert abs(held - stated) <= 0.05 * stated


def test_no_negative_percentage_of_time():
    assert "no faster" in _faster(0.0021, 0.0020)
    assert "no faster" in _faster(0.0020, 0.0020)
    assert "50% less time" in _faster(0.001, 0.002)
    rows = [{"mode": m, "saved_bytes": s, "param_bytes": 0, "input_bytes": 0, "activation_bytes": s,
             "cast_bytes": 0, "peak_bytes": None, "held_bytes": None, "peak_source": "cpu_profiler",
             "rss_delta_bytes": None, "time_s": t, "time_min_s": t, "time_max_s": t, "repeat": 1}
            for m, s, t in (("grad", 100, 0.010), ("no_grad", 0, 0.013), ("inference_mode", 0, 0.012))]
    text = str(Comparison(rows, "cpu"))
    assert not re.search(r"-\s*\d+(\.\d+)?\s*%", text)
    assert "is no faster" in text


def test_running_user_profiler_is_left_alone():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        c = compare_quietly(net, torch.randn(5, 4), repeat=1)
        torch.mm(torch.randn(2, 2), torch.randn(2, 2))
    df = c.to_pandas()
    assert df["peak_bytes"].isna().all() and df["peak_source"].str.startswith("none").all()
    assert any(e.name == "aten::mm" for e in prof.events())  # the user's profiler kept recording


def test_hooks_removed_when_the_forward_raises():
    def boom(x):
        x.mul(2).relu()  # saves a tensor under the hooks first
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gp.compare_no_grad(boom, torch.randn(3, requires_grad=True))
    assert hooks_top() is None
