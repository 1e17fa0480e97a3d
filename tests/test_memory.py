"""Autograd memory: saved bytes checked by hand, lifetimes, retain_graph, leaks, unused graphs,
in-place writes, and that the collector changes nothing and keeps nothing alive."""

from __future__ import annotations

import gc

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradprobe as gp
from tests.clean import hooks_top
from tests.conftest import demo_site, site_of

F32 = 4  # bytes per float32
I64 = 8


def findings(probe, kind):
    return [f for f in probe.findings if f.kind == kind]



# --- exact bytes ---------------------------------------------------------------------------
def test_linear_saves_input_and_weight_exact():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    with gp.Probe(lin) as probe:
        x = torch.randn(2, 4, requires_grad=True)  # a user input that wants a gradient
        lin(x).sum().backward()
    t = probe.to_pandas()
    s = t["saved"].set_index("kind")
    # addmm(bias, x, W.t()) saves x (for dW) and W.t() (for dx), a view of the weight's storage
    assert s.loc["input", "nbytes"] == 2 * 4 * F32 == 32
    assert s.loc["parameter", "nbytes"] == 3 * 4 * F32 == 48
    assert s.loc["parameter", "param"] == "weight"
    assert s.loc["parameter", "shape"] == "4x3"  # the transposed view
    assert set(t["saved"]["op"]) == {"AddmmBackward0"}
    assert set(t["saved"]["module"]) == {""}
    assert set(t["saved"]["freed_by"]) == {"backward"}
    bw = t["backward"].iloc[0]
    assert bw["saved_bytes"] == 32 + 48 and bw["retained_bytes"] == 0
    assert t["modules"].set_index("module").loc["", "saved_bytes"] == 80


def test_mlp_saved_bytes_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    with gp.Probe(net) as probe:
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
    saved = probe.to_pandas()["saved"]
    rows = {(r.module if isinstance(r.module, str) else None, r.op, r.kind): r.nbytes for r in saved.itertuples()}
    # layer 0: x needs no grad, so addmm saves only x (for dW0), not W0
    assert rows[("0", "AddmmBackward0", "input")] == 5 * 4 * F32 == 80
    # ReLU saves its result
    assert rows[("1", "ReluBackward0", "activation")] == 5 * 3 * F32 == 60
    # layer 2 saves W2.t() and its input, which is the ReLU result's storage: counted once (0 here)
    assert rows[("2", "AddmmBackward0", "parameter")] == 2 * 3 * F32 == 24
    assert rows[("2", "AddmmBackward0", "activation")] == 0
    # mse_loss saves the prediction and the target
    assert rows[(None, "MseLossBackward0", "activation")] == 5 * 2 * F32 == 40
    assert rows[(None, "MseLossBackward0", "input")] == 5 * 2 * F32 == 40
    assert saved["nbytes"].sum() == 80 + 60 + 24 + 40 + 40
    bw = probe.to_pandas()["backward"].iloc[0]
    assert bw["saved_bytes"] == 244
    mods = probe.to_pandas()["modules"].set_index("module")["saved_bytes"]
    # a module's saved bytes include its children's; the loss runs outside the model
    assert mods["0"] == 80 and mods["2"] == 24 and mods[""] == 80 + 60 + 24


def test_small_view_counts_its_whole_storage():
    with gp.Probe(None) as probe:
        w = torch.randn(100, 10, requires_grad=True)
        big = w * 2  # an activation: 100*10 floats
        big[:2].sin().sum().backward()  # sin saves the 2x10 view
    s = probe.to_pandas()["saved"]
    row = s[s["op"] == "SinBackward0"].iloc[0]
    assert row["nbytes"] == 100 * 10 * F32 == 4000
    assert row["view_bytes"] == 2 * 10 * F32 == 80
    assert row["kind"] == "activation"


# --- lifetimes ------------------------------------------------------------------------------
def test_freed_by_each_lifetime():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with gp.Probe(lin) as probe:
        a = lin(x).sigmoid()
        a.sum().backward()  # backward
        b = lin(x).sigmoid()
        del b  # graph_dropped
        c = lin(x).sigmoid()
        c.sum().backward(retain_graph=True)
        del c  # retained
        d = lin(x).sigmoid()  # alive
        s = probe.to_pandas()["saved"]
    by_graph = s.groupby("graph")["freed_by"].agg(set)
    assert list(by_graph) == [{"backward"}, {"graph_dropped"}, {"retained"}, {"alive"}]
    assert s["t_freed"].isna().tolist() == (s["freed_by"] == "alive").tolist()
    del d


NODE_HOOKS = callable(getattr(torch._C._autograd, "_push_node_creation_hook", None))


def test_probe_exit_removes_hooks_and_keeps_nothing_alive():
    from torch.multiprocessing.reductions import StorageWeakRef
    lin = nn.Linear(8, 8)
    assert hooks_top() is None
    with gp.Probe(lin) as probe:
        # torch 2.14+: saved tensors are read from new nodes, no saved-tensor hooks are installed
        assert (hooks_top() is None) == NODE_HOOKS
        h = lin(torch.randn(4, 8)).relu()  # relu saves its result
        ref = StorageWeakRef(h.untyped_storage())
        out = h.sigmoid()
    assert hooks_top() is None
    del h
    gc.collect()
    assert not ref.expired()  # the graph still holds the saved activation
    del out
    gc.collect()
    assert ref.expired()  # dropping the graph frees it: the probe keeps no reference
    assert set(probe.to_pandas()["saved"]["freed_by"]) == {"graph_dropped"}


def test_hooks_removed_after_exception():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError):
        with gp.Probe(lin):
            lin(torch.randn(1, 2))
            raise ValueError("boom")
    assert hooks_top() is None


def _train(model, data, probe=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def test_collector_changes_no_gradient():
    torch.manual_seed(0)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.0), nn.Linear(16, 3))

    plain = make()
    g0 = _train(plain, data)
    probed = make()
    with gp.Probe(probed):
        g1 = _train(probed, data)
    for a, b in zip(g0, g1):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), probed.parameters()))


def test_inplace_error_still_raised_like_pytorch():
    """With hooks installed PyTorch skips its version check; the collector must raise as PyTorch does."""
    def run():
        a = torch.randn(3, requires_grad=True)
        out = a.sigmoid()
        out.detach().zero_()
        out.sum().backward()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        with gp.Probe(None):
            run()


# --- retain_graph ------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_retain_graph_unneeded_fresh_forward():
    net = _mlp()
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        for _ in range(3):
            loss1 = net(x).sum()
            loss1.backward(retain_graph=True)  # RETAIN-UNNEEDED
            loss2 = net(x).pow(2).mean()
            loss2.backward()
    t = probe.to_pandas()
    bw = t["backward"]
    # each graph: x (4*6*4=96, input), relu result (4*5*4=80), W2.t() (3*5*4=60, parameter)
    graph = 96 + 80 + 60
    first = bw.iloc[0]
    assert first["retain_graph"] and first["saved_bytes"] == graph and first["retained_bytes"] == graph
    assert pd.isna(first["reused_by"])
    assert bw["retained_bytes"].tolist() == [graph, 0] * 3
    (f,) = findings(probe, "retain_graph_unneeded")
    assert f.severity == "warning"
    assert f.site == site_of("RETAIN-UNNEEDED")
    assert f.nbytes == graph
    assert "236 bytes" in f.message and "until the graph was dropped" in f.message
    # while the first graph is retained the second forward saves its relu result (80) and the pow input
    # (4*3*4=48); x's and W2's storages are already held, so the peak is 236 + 80 + 48 = 364. Released at
    # backward, only the relu result (80) would be gone: x and W2 are saved again by the second forward
    assert first["retain_saving_bytes"] == 80


def test_retain_graph_reused_is_info_with_alternative():
    net = _mlp()
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        out = net(x)
        loss1 = out.sum()
        loss2 = out.pow(2).mean()
        loss1.backward(retain_graph=True)  # RETAIN-REUSED
        loss2.backward()
    bw = probe.to_pandas()["backward"]
    assert bw.loc[0, "reused_by"] == 1
    # loss1 = out.sum() goes through x (96), the relu result (80) and W2.t() (60); out.pow's input (48)
    # belongs to loss2 only. One forward holds all of it at once, so the overall peak is unchanged
    assert bw.loc[0, "retained_bytes"] == 96 + 80 + 60
    assert bw.loc[0, "saved_bytes"] == 236 and bw.loc[1, "saved_bytes"] == 236 + 48
    assert bw.loc[0, "retain_peak_saving_bytes"] == 0
    assert bw.loc[0, "released_by"] == "backward 1"
    (f,) = findings(probe, "retain_graph_avoidable")
    assert f.severity == "info"
    assert not findings(probe, "retain_graph_unneeded")
    assert f.site == site_of("RETAIN-REUSED")
    assert "(loss1 + loss2).backward()" in f.message


def test_counterfactual_timeline_exact():
    net = _mlp()
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        loss1 = net(x).sum()
        loss1.backward(retain_graph=True)
        loss2 = net(x).sum()
        loss2.backward()
        del loss1
    mem = probe.to_pandas()["memory"]
    graph = 96 + 80 + 60  # as above
    second = 80  # only the new relu result: x's and W2's storages are still held by the first graph
    assert mem["peak_saved_bytes"].max() == graph + second
    assert mem["peak_counterfactual_bytes"].max() == graph  # freed at its first backward
    end0 = mem[(mem["event"] == "backward_end") & (mem["backward"] == 0)].iloc[0]
    assert end0["live_saved_bytes"] == graph and end0["counterfactual_saved_bytes"] == 0


# --- leaks across steps ---------------------------------------------------------------------------
def test_graph_leak_epoch_loss_accumulated_without_item():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        epoch_loss = 0
        for _ in range(6):
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss += loss  # LEAK
    (f,) = findings(probe, "graph_leak")
    assert f.site == site_of("LEAK")
    assert "growing" in f.message and "loss.item()" in f.message
    mem = probe.to_pandas()["memory"]
    ends = mem[mem["event"] == "step_end"]
    leaked = ends["leaked_graphs"].fillna(0).astype(int).tolist()
    assert leaked[-1] > leaked[2] > 0  # grows
    assert ends["leaked_bytes"].dropna().eq(0).all()  # backward freed the activations; only nodes leak


def test_no_leak_in_a_plain_loop():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        epoch_loss = 0.0
        for _ in range(6):
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss += loss.item()
    assert not findings(probe, "graph_leak")
    assert not findings(probe, "unused_graph")
    assert not findings(probe, "retain_graph_unneeded")


def test_graph_leak_list_of_losses_with_retain_keeps_activations():
    net = _mlp()
    x = torch.randn(4, 6)
    losses = []
    with gp.Probe(net) as probe:
        for _ in range(5):
            loss = net(x).sum()
            loss.backward(retain_graph=True)  # LIST-RETAIN
            losses.append(loss)
            probe.step()
    (f,) = findings(probe, "graph_leak")
    assert f.site == site_of("LIST-RETAIN")
    assert f.nbytes > 0  # activations and inputs are kept, not just nodes
    ends = probe.to_pandas()["memory"].query("event == 'step_end'")
    assert ends["leaked_bytes"].dropna().is_monotonic_increasing


# --- unused graphs --------------------------------------------------------------------------------------
def test_unused_graph_validation_without_no_grad():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, xv = torch.randn(4, 6), torch.randn(7, 6)
    with gp.Probe(net) as probe:
        for _ in range(3):
            loss = net(x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for _ in range(2):
                out = net(xv)  # VALIDATION
                val = out.pow(2).mean().item()
    (f,) = findings(probe, "unused_graph")
    assert f.site == site_of("VALIDATION")
    # what torch.no_grad() would save per validation forward: the activations
    # relu result 7*5*4 = 140 and the pow input (net output) 7*3*4 = 84
    assert f.nbytes == 7 * 5 * F32 + 7 * 3 * F32 == 224
    assert f.severity == "warning" and "torch.no_grad()" in f.message
    del out, val


TRACKS = [("grads", "cuts", "memory"), ("memory",)]  # memory alone is complete: op names, in-place writes


@pytest.mark.parametrize("track", TRACKS)
def test_op_names_without_the_cuts_track(track):
    """Each saved tensor is named by the node that saved it, also with track=("memory",)."""
    lin = nn.Linear(3, 3)
    with gp.Probe(lin, track=track, every=1) as probe:
        F.cross_entropy(lin(torch.randn(2, 3)).relu(), torch.tensor([0, 2])).backward()
    saved = probe.to_pandas()["saved"]
    assert saved["op"].notna().all()
    assert {"AddmmBackward0", "ReluBackward0", "LogSoftmaxBackward0", "NllLossBackward0"} <= set(saved["op"])
    assert set(saved.loc[saved["op"] == "AddmmBackward0", "func"]) == {"linear"}


def test_checkpoint_recomputation_is_marked_not_counted():
    from torch.utils.checkpoint import checkpoint
    net = _mlp()
    x = torch.randn(4, 6, requires_grad=True)
    with gp.Probe(net, every=1) as probe:
        h = checkpoint(net[0], x, use_reentrant=True)
        net[2](net[1](h)).sum().backward()
    t = probe.to_pandas()
    rec = t["memory"][t["memory"]["event"] == "recompute"]
    assert len(rec) == 1 and "not counted" in rec["note"].iloc[0]
    began = t["memory"].loc[t["memory"]["event"] == "backward_begin", "t"].iloc[0]
    assert len(t["saved"]) and (t["saved"]["t_saved"] < began).all()  # nothing saved during the backward


# --- in-place writes to saved tensors ---------------------------------------------------------------------
@pytest.mark.parametrize("track", TRACKS)
def test_inplace_through_data_is_an_error(track):
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with gp.Probe(lin, track=track) as probe:
        out = lin(x).sigmoid()
        c = out.data
        c.zero_()  # DATA-WRITE
        out.sum().backward()
    (f,) = findings(probe, "inplace_saved")
    assert f.severity == "error"
    assert f.site == site_of("DATA-WRITE")
    assert f.nbytes == 2 * 3 * F32
    assert ".data" in f.message and "silently wrong" in f.message


@pytest.mark.parametrize("track", TRACKS)
def test_inplace_through_detach_is_a_warning_before_pytorch_raises(track):
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with gp.Probe(lin, track=track) as probe:
        out = lin(x).sigmoid()
        c = out.detach()
        c.zero_()  # DETACH-WRITE
        (f,) = findings(probe, "inplace_saved")  # known before backward runs
        assert f.severity == "warning"
        assert f.site == site_of("DETACH-WRITE")
        assert "will raise" in f.message or "raises" in f.message
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_inplace_op_that_saves_its_own_result_is_not_flagged():
    with gp.Probe(None) as probe:
        w = torch.randn(4, requires_grad=True)
        h = w * 2
        h.relu_()  # relu_ saves its own result after writing
        h.sum().backward()
    assert not findings(probe, "inplace_saved")


# --- shadowing hooks ----------------------------------------------------------------------------------------------
def test_checkpoint_shadows_and_says_so():
    from torch.utils.checkpoint import checkpoint
    net = _mlp()
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        h = checkpoint(net[0], x, use_reentrant=False)  # CHECKPOINT
        net[2](net[1](h)).sum().backward()
    (f,) = findings(probe, "saved_hooks_shadowed")
    assert f.site == site_of("CHECKPOINT")
    mem = probe.to_pandas()["memory"]
    assert (mem["event"] == "hooks_shadowed").any()


# --- compare_no_grad -----------------------------------------------------------------------------------------------
def test_compare_no_grad_bytes_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    c = gp.compare_no_grad(net, x, repeat=2)
    df = c.to_pandas().set_index("mode")
    # x (5*4*4=80), relu result (5*3*4=60), W2.t() (2*3*4=24)
    assert df.loc["grad", "saved_bytes"] == 80 + 60 + 24
    assert df.loc["grad", "activation_bytes"] == 60
    assert df.loc["no_grad", "saved_bytes"] == 0 and df.loc["inference_mode", "saved_bytes"] == 0
    assert (df["time_s"] > 0).all() and (df["repeat"] == 2).all()
    assert isinstance(c.figure(), go.Figure)
    assert "no_grad" in str(c) and "<table" in c._repr_html_()


# --- the tables stay consistent ---------------------------------------------------------------------------
def test_memory_rows_and_rss_per_step():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        for _ in range(3):
            net(x).sum().backward()
            opt.step()
            opt.zero_grad()
    mem = probe.to_pandas()["memory"]
    assert {"enter", "forward", "backward_begin", "backward_end", "step_end", "exit"} <= set(mem["event"])
    assert mem.loc[mem["event"] == "step_end", "rss_bytes"].notna().all()
    assert mem["cuda_allocated_bytes"].isna().all()  # CPU: CUDA is never touched
    begins = mem[mem["event"] == "backward_begin"]
    assert (begins["live_saved_bytes"] == 96 + 80 + 60).all()
    assert (mem.loc[mem["event"] == "backward_end", "live_saved_bytes"] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_figures():
    net = _mlp().cuda()
    x = torch.randn(4, 6, device="cuda")
    with gp.Probe(net) as probe:
        net(x).sum().backward()
    t = probe.to_pandas()
    assert (t["saved"]["alloc_bytes"] % 512 == 0).all()
    assert t["memory"]["cuda_allocated_bytes"].notna().any()


@pytest.mark.parametrize("name", ["retain_graph", "validation", "inplace"])
def test_demos_name_kind_and_line(name, capsys):
    import importlib
    mod = importlib.import_module(f"demos.{name}")
    probe = mod.main()
    if name == "retain_graph":
        unneeded = [f for f in findings(probe, "retain_graph_unneeded") if f.severity == "warning"]
        reused = [f for f in findings(probe, "retain_graph_avoidable") if f.severity == "info"]
        assert len(unneeded) == 1 and unneeded[0].site == demo_site(name, "loss1.backward(retain_graph=True)", 1)
        assert len(reused) == 1 and reused[0].site == demo_site(name, "loss1.backward(retain_graph=True)", 2)
        # 64x1000 input, 64x500 and 64x100 relu results, W2.t() 100x500, W3.t() 10x100, cross_entropy's
        # log-softmax 64x10, the int64 targets and the 4-byte total weight
        graph = (64 * 1000 + 64 * 500 + 64 * 100 + 100 * 500 + 10 * 100 + 64 * 10) * F32 + 64 * I64 + 4
        assert unneeded[0].nbytes == graph
        assert not findings(probe, "graph_leak")
    elif name == "validation":
        (f,) = findings(probe, "unused_graph")
        assert f.site == demo_site(name, "out = model(x)")
        # 128x256 twice (ReLU results) and cross_entropy's 128x10 log-softmax plus its 4-byte total weight
        assert f.nbytes == (128 * 256 * 2 + 128 * 10) * F32 + 4
    else:
        kinds = {f.severity: f for f in findings(probe, "inplace_saved")}
        assert kinds["error"].site == demo_site(name, "c.zero_()", 1)
        assert kinds["warning"].site == demo_site(name, "c.zero_()", 2)
