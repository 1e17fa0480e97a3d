"""One finding per root cause, with the right advice (issue 10, section 2): the three retain_graph
verdicts, inplace_saved only about graphs a backward went through, a cut that names the graph it left
unused instead of an unused_graph warning, and counts that say when they are sampled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.diagnose import leaks
from tests.conftest import site_of

F32 = 4
# the graph of _mlp() on a 4x6 input: x (4*6*4=96, input), the relu result (4*5*4=80), W2.t() (3*5*4=60)
GRAPH = 96 + 80 + 60
RETAIN_KINDS = ("retain_graph_unneeded", "retain_graph_avoidable")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def of(probe, *kinds):
    return [f for f in probe.findings if f.kind in kinds]


# --- retain_graph: avoidable, needed, unneeded ------------------------------------------------------
def test_two_losses_of_one_forward_back_to_back_is_one_info_avoidable():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        for _ in range(3):
            out = net(x)
            loss1, loss2 = out.sum(), out.pow(2).mean()
            opt.zero_grad()
            loss1.backward(retain_graph=True)  # AVOIDABLE
            loss2.backward()
            opt.step()
    bw = probe.to_pandas()["backward"]
    assert bw["opt_steps"].tolist() == [0, 0, 1, 1, 2, 2]
    assert not bw["grads_changed"].any()
    (f,) = of(probe, *RETAIN_KINDS)
    assert f.kind == "retain_graph_avoidable" and f.severity == "info"
    assert f.site == site_of("AVOIDABLE")
    assert f.nbytes == GRAPH
    assert "(loss1 + loss2).backward()" in f.message and "236 bytes" in f.message


def test_optimizer_step_between_the_backwards_means_retain_is_needed():
    """Multi-task: the first head steps right after its own loss; the second loss then goes back through
    the shared trunk's retained graph. retain_graph=True is needed there: no finding."""
    torch.manual_seed(0)
    trunk, head1, head2 = nn.Linear(6, 5), nn.Linear(5, 1), nn.Linear(5, 1)
    opt1 = torch.optim.SGD(head1.parameters(), lr=0.01)
    opt2 = torch.optim.SGD(list(trunk.parameters()) + list(head2.parameters()), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe({"trunk": trunk, "head1": head1, "head2": head2}) as probe:
        for _ in range(3):
            h = torch.relu(trunk(x))
            loss1, loss2 = head1(h).pow(2).mean(), head2(h).abs().mean()
            opt1.zero_grad(); opt2.zero_grad()
            loss1.backward(retain_graph=True)  # NEEDED-STEP
            opt1.step()  # head1's weights change in place; loss2 does not go through them
            loss2.backward()
            opt2.step()
    bw = probe.to_pandas()["backward"]
    assert bw["retain_graph"].tolist() == [True, False] * 3
    assert bw["reused_by"].tolist()[::2] == [1, 3, 5]  # the second backward did go through the graph
    steps = bw["opt_steps"].tolist()
    assert all(steps[i + 1] == steps[i] + 1 for i in range(0, 6, 2))  # opt1.step() between
    assert not of(probe, *RETAIN_KINDS), [f.message for f in of(probe, *RETAIN_KINDS)]


def test_zero_grad_between_the_backwards_means_retain_is_needed():
    """Per-loss gradients (PCGrad-like): the first loss's gradients are read and cleared before the
    second backward, so one backward of the sum cannot replace the two."""
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        for _ in range(3):
            out = net(x)
            loss1, loss2 = out.sum(), out.pow(2).mean()
            opt.zero_grad()
            loss1.backward(retain_graph=True)
            g1 = [p.grad.clone() for p in net.parameters()]
            opt.zero_grad()
            loss2.backward()
            for p, g in zip(net.parameters(), g1):
                p.grad += g
            opt.step()
    bw = probe.to_pandas()["backward"]
    assert bw["reused_by"].tolist()[::2] == [1, 3, 5]
    assert bw["grads_changed"].tolist() == [False, True] * 3
    assert bw["opt_steps"].tolist() == [0, 0, 1, 1, 2, 2]
    assert not of(probe, *RETAIN_KINDS)


@pytest.mark.parametrize("retain", [None, True])
def test_gradient_penalty_gives_no_retain_finding(retain):
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gp.Probe(net) as probe:
        for _ in range(3):
            x = torch.randn(4, 6, requires_grad=True)
            out = net(x)
            (g,) = torch.autograd.grad(out.sum(), x, create_graph=True, retain_graph=retain)
            loss = out.pow(2).mean() + (g.norm(2, dim=1) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    bw = probe.to_pandas()["backward"]
    assert bw["api"].tolist() == ["autograd.grad", "tensor.backward"] * 3
    assert bw["create_graph"].tolist() == [True, False] * 3
    assert not of(probe, *RETAIN_KINDS)


def test_retain_before_a_fresh_forward_is_a_warning_with_the_bytes_held():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    with gp.Probe(net) as probe:
        for _ in range(3):
            opt.zero_grad()
            loss1 = net(x).sum()
            loss1.backward(retain_graph=True)  # UNNEEDED
            loss2 = net(x).pow(2).mean()
            loss2.backward()
            opt.step()
    (f,) = of(probe, *RETAIN_KINDS)
    assert f.kind == "retain_graph_unneeded" and f.severity == "warning"
    assert f.site == site_of("UNNEEDED")
    assert f.nbytes == GRAPH
    assert "236 bytes" in f.message and "Remove retain_graph=True" in f.message
    assert "sampled" not in f.message  # every step captured in full: nothing to qualify


# --- a cut is one finding that names what it left unused ---------------------------------------------
def _gd():
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    D = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return G, D


def test_detach_bug_is_one_error_naming_the_unused_graph_not_a_no_grad_advice():
    G, D = _gd()
    opt = torch.optim.SGD(list(G.parameters()) + list(D.parameters()), lr=0.1)
    with gp.Probe({"G": G, "D": D}) as probe:
        for _ in range(3):
            fake = G(torch.randn(5, 4)).detach()  # DETACH-BUG
            loss = -D(fake).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    site = site_of("DETACH-BUG")
    assert not of(probe, "unused_graph"), [f.message for f in of(probe, "unused_graph")]
    assert not of(probe, "detach_cut")  # told by the no_gradient error, not a second finding
    at_cut = [f for f in probe.findings if f.site == site]
    assert len(at_cut) == 1
    (f,) = at_cut
    assert [x.severity for x in probe.findings if x.severity == "error"] == ["error"]
    assert f.kind == "no_gradient" and f.severity == "error"
    assert f.params == ["G.0.weight", "G.0.bias", "G.2.weight", "G.2.bias"]
    assert ".detach() at " + site in f.message and "remove the cut" in f.message
    # the generator's graph of each step: what no_grad would have "saved" is its ReLU result, 5x8 floats
    assert f.nbytes == 5 * 8 * F32 == 160
    assert "built 3 graphs that no backward used (160 bytes of activations each, 480 bytes over all 3)" in f.message
    assert "not a reason to wrap the forward in torch.no_grad()" in f.message


def test_deliberate_gan_detach_stays_info():
    G, D = _gd()
    opt_g, opt_d = torch.optim.SGD(G.parameters(), 0.1), torch.optim.SGD(D.parameters(), 0.1)
    with gp.Probe({"G": G, "D": D}) as probe:
        for _ in range(3):
            fake = G(torch.randn(5, 4))
            d_loss = D(fake.detach()).mean()  # GAN-D
            opt_d.zero_grad(); d_loss.backward(); opt_d.step()
            g_loss = -D(fake).mean()
            opt_g.zero_grad(); g_loss.backward(); opt_g.step()
    at_cut = [f for f in probe.findings if f.site == site_of("GAN-D")]
    assert at_cut and all(f.severity == "info" for f in at_cut), [(f.kind, f.severity) for f in at_cut]
    assert not [f for f in probe.findings if f.severity == "error"]
    assert not of(probe, "unused_graph")  # the generator's graph is used by its own step


def test_validation_graph_is_still_an_unused_graph_warning_beside_a_cut():
    """An unused graph that no cut explains (validation outside no_grad) keeps its own advice."""
    G, D = _gd()
    opt = torch.optim.SGD(list(G.parameters()) + list(D.parameters()), lr=0.1)
    with gp.Probe({"G": G, "D": D}) as probe:
        for _ in range(2):
            fake = G(torch.randn(5, 4)).detach()
            loss = -D(fake).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            score = D(torch.randn(7, 4)).mean().item()  # VALIDATION
    (f,) = of(probe, "unused_graph")
    assert f.site == site_of("VALIDATION") and f.severity == "warning"
    assert f.nbytes == 7 * 8 * F32  # D's ReLU result
    assert "torch.no_grad()" in f.message
    del score


# --- inplace_saved only about graphs a backward went through ------------------------------------------
@pytest.mark.parametrize("drop", [True, False])
def test_inplace_on_a_graph_never_backwarded_is_not_flagged(drop):
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with gp.Probe(lin) as probe:
        for _ in range(3):
            out = lin(x).sigmoid()  # sigmoid saves its result
            out.detach().mul_(2)  # writes into the saved result; no backward ever uses this graph
            if drop:
                del out
            lin(x).sum().backward()
    saved = probe.to_pandas()["saved"]
    assert saved["inplace_site"].notna().sum() == 3  # the writes are recorded...
    assert saved["inplace_backward"].isna().all()
    assert not of(probe, "inplace_saved")  # ...but no gradient was computed from them


def test_inplace_then_backward_through_it_is_still_flagged():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with gp.Probe(lin) as probe:
        out = lin(x).sigmoid()
        out.data.mul_(2)  # DATA-WRITE
        out.sum().backward()
    (f,) = of(probe, "inplace_saved")
    assert f.severity == "error" and f.site == site_of("DATA-WRITE") and f.nbytes == 2 * 3 * F32


# --- counts say when they are sampled --------------------------------------------------------------------
def test_growth_is_never_about_0_nodes_per_step():
    assert leaks._growth(3, 0, 10) == ", growing by 3 nodes over 10 steps"
    assert leaks._growth(30, 2048, 10) == ", growing by about 3 nodes per step and about 205 bytes per step"
    assert leaks._growth(0, 0, 10) == ", not growing"
    assert "about 0" not in leaks._growth(1, 5, 60)


def test_unused_graph_count_says_it_was_sampled():
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, xv = torch.randn(4, 6), torch.randn(7, 6)
    with gp.Probe(net, every=3) as probe:
        for _ in range(6):
            loss = net(x).sum()
            opt.zero_grad(); loss.backward(); opt.step()
            val = net(xv).pow(2).mean().item()  # SAMPLED-VALIDATION
    steps = probe.to_pandas()["steps"]
    detail = int(steps["detail"].sum())
    assert 0 < detail < 6
    (f,) = of(probe, "unused_graph")
    assert f.site == site_of("SAMPLED-VALIDATION")
    assert f"seen in {detail} sampled steps of 6" in f.message
    del val


def test_inplace_then_pytorch_raises_is_flagged_after_the_run():
    """Whether PyTorch's own version check or the probe's unpack hook sees the write first (it differs between
    torch versions), the refused backward makes the write worth a finding, also once the probe has exited."""
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with gp.Probe(lin) as probe:
        out = lin(x).sigmoid()
        out.detach().zero_()  # DETACH-WRITE
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        del out
    (f,) = of(probe, "inplace_saved")
    assert f.severity == "warning" and f.site == site_of("DETACH-WRITE") and f.nbytes == 2 * 3 * F32
    assert "Backward 0 raised that error" in f.message


# --- notes about what the probe could not see: one per cause and region -----------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))  # INSIDE-1
        h = torch.tanh(self.b(h))  # INSIDE-2
        return h * 2


def test_checkpoint_and_save_on_cpu_notes_are_one_per_region_not_per_line():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block(), _Block())
    with gp.Probe(net, every=1) as probe:
        for _ in range(3):
            x = torch.randn(4, 8, requires_grad=True)
            h = checkpoint(net[0], x, use_reentrant=False)  # CKPT-A
            h = checkpoint(net[1], h, use_reentrant=False)  # CKPT-B
            with torch.autograd.graph.save_on_cpu():
                h = net[2](h)  # OFFLOAD
            h.sum().backward()
    notes = of(probe, "saved_hooks_shadowed")
    assert len(notes) == 3, [f.message for f in notes]  # two checkpoint calls, one save_on_cpu region
    ckpt = {f.site: f.message for f in notes if "`checkpoint(...)` call" in f.message}
    assert set(ckpt) == {site_of("CKPT-A"), site_of("CKPT-B")}
    (offload,) = [f for f in notes if "save_on_cpu" in f.message]
    # the lines of the region (torch 2.14 sees each op's line, 2.13 the module call): one note for them all
    assert offload.site in {site_of("OFFLOAD"), site_of("INSIDE-1"), site_of("INSIDE-2")}
    assert "steps 0, 1, 2" in offload.message and site_of("INSIDE-2") not in str(ckpt)
    hooks = probe.to_pandas()["memory"].query("event == 'hooks_shadowed'")["hooks"]
    assert set(hooks) == {"checkpoint", "save_on_cpu"}
