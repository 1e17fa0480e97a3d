"""Issue 10, the rest: a "backward through the graph a second time" error names the earlier backward that
freed the graph and the line whose tensor carried it across; step ranges stay within the run and counts say
when they are sampled; Sequential/ModuleList children are named with their type in the branches figure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.conftest import site_of


# --- backward through a freed graph ------------------------------------------------------------------
class WordLM(nn.Module):
    """word_language_model's RNNModel, small: embedding, LSTM, decoder."""

    def __init__(self, ntoken=20, ninp=8, nhid=16):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


def _error(probe):
    (f,) = [f for f in probe.findings if f.kind == "backward_error"]
    return f


def test_rnn_hidden_not_detached_names_the_backward_that_freed_it_and_the_forward_given_it():
    model = WordLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hidden = (torch.zeros(1, 4, 16), torch.zeros(1, 4, 16))
    with pytest.raises(RuntimeError, match="second time"):
        with gp.Probe(model) as probe:
            for _ in range(3):
                x, y = torch.randint(0, 20, (5, 4)), torch.randint(0, 20, (5, 4))
                out, hidden = model(x, hidden)  # not detached between batches  # CARRIED
                loss = nn.functional.cross_entropy(out.view(-1, 20), y.view(-1))
                opt.zero_grad()
                loss.backward()  # BACKWARD
                opt.step()
    bw = probe.to_pandas()["backward"]
    assert bw["error"].notna().tolist() == [False, True]
    assert bw["freed_graph"].iloc[1] == 0 and bw["carried_site"].iloc[1] == site_of("CARRIED")
    f = _error(probe)
    assert f.severity == "error" and f.site == site_of("BACKWARD") and f.step == 1
    assert f"which backward 0 at {site_of('BACKWARD')} had already freed" in f.message
    assert f"The forward at {site_of('CARRIED')} was given a tensor of that earlier graph" in f.message
    assert "hidden.detach()" in f.message and "before they have already" not in f.message


class Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Disc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 1)

    def forward(self, x):
        return self.net(x)


def test_gan_fake_shared_by_two_losses_names_the_discriminator_backward_and_the_fake_line():
    g, d = Gen(), Disc()
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="second time"):
        with gp.Probe({"G": g, "D": d}) as probe:
            real = torch.randn(4, 8)
            fake = g(torch.randn(4, 4))  # FAKE
            d_loss = nn.functional.softplus(-d(real)).mean() + nn.functional.softplus(d(fake)).mean()
            opt_d.zero_grad()
            d_loss.backward()  # D_BACKWARD
            opt_d.step()
            g_loss = nn.functional.softplus(-d(fake)).mean()  # G_LOSS
            opt_g.zero_grad()
            g_loss.backward()  # G_BACKWARD
    f = _error(probe)
    assert f.site == site_of("G_BACKWARD")
    assert f"the forward at {site_of('FAKE')} (step 0), which backward 0 at {site_of('D_BACKWARD')}" in f.message
    assert f"the forward at {site_of('G_LOSS')} was given a tensor made there" in f.message
    assert "D(fake.detach())" in f.message and "retain_graph=True` to backward 0" in f.message


def test_freed_graph_without_memory_tracking_still_names_the_last_freeing_backward():
    g, d = Gen(), Disc()
    with pytest.raises(RuntimeError, match="second time"):
        with gp.Probe({"G": g, "D": d}, track=("grads",)) as probe:
            fake = g(torch.randn(4, 4))
            d(fake).mean().backward()  # FIRST
            d(fake).mean().backward()
    f = _error(probe)
    assert f"the last one was backward 0 at {site_of('FIRST')}" in f.message


def test_a_probe_run_through_a_freed_graph_raises_the_same_error_as_without_it():
    def run(probe):
        model = WordLM()
        hidden = None
        msgs = []
        try:
            with probe if probe is not None else torch.enable_grad():
                for _ in range(2):
                    out, hidden = model(torch.randint(0, 20, (5, 4)), hidden)
                    out.sum().backward()
        except RuntimeError as e:
            msgs.append(str(e))
        return msgs

    torch.manual_seed(0)
    plain = run(None)
    torch.manual_seed(0)
    probed = run(gp.Probe())
    assert plain == probed and len(plain) == 1


# --- step ranges within the run, sampled counts -------------------------------------------------------
class AuxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x, use_aux):
        h = torch.relu(self.a(x))
        return self.b(h) + self.aux(h) if use_aux else self.b(h)


def test_sixty_steps_default_schedule_name_only_steps_of_the_run_and_say_what_was_sampled():
    """An aux head used every 20th step (each change triggers a detail step after it) and a forward without
    no_grad after every 20th optimizer step: the last one comes after step 59, the run's last."""
    model = AuxNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model) as probe:
        for i in range(60):
            loss = model(torch.randn(4, 6), i % 20 == 19).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % 20 == 19:
                model(torch.randn(4, 6), False).sum()  # VALIDATION
    t = probe.to_pandas()
    assert t["steps"]["step"].tolist() == list(range(60)) and t["backward"]["step"].max() == 59
    assert 60 in set(t["saved"]["step"])  # the last validation forward came after the last step
    (unused,) = [f for f in probe.findings if f.kind == "unused_graph"]
    assert unused.site == site_of("VALIDATION")
    assert "in steps 20, 40 and the time after step 59 (seen in 14 sampled steps of 60" in unused.message
    assert "60 (" not in unused.message and ", 60" not in unused.message
    (none,) = [f for f in probe.findings if f.kind == "no_gradient"]
    # aux got gradients in backward 19, 39, 59: steps without per-parameter rows, where no tracked tensor
    # went without one (params_none == 0) -- so not an error, and the count says it is a sample
    assert none.severity == "info" and none.params == ["aux.weight", "aux.bias"]
    assert "received no gradient in 14 sampled backward calls of 60 (0..41)" in none.message
    assert "in backward 19, not sampled in detail, every tracked tensor got one" in none.message
    for f in probe.findings:
        assert "step 60" not in f.message and "steps 60" not in f.message


def test_span_wording():
    from gradprobe.text import span

    assert span([3], "step") == "step 3" and span([2, 0], "step") == "steps 0, 2"
    assert span(range(0, 40, 2), "step") == "20 steps (0..38)"
    assert span([20, 40, 60], "step", last=59) == "steps 20, 40 and the time after step 59"
    assert span([60], "step", last=59) == "the time after step 59"
    assert span(range(14), "backward", of=60) == "14 sampled backward calls of 60 (0..13)"
    assert span([0, 20], "backward", of=60) == "backward calls 0, 20 (sampled: 2 of 60)"
    assert span([0, 1], "backward", of=2) == "backward calls 0, 1"


# --- treemap names ------------------------------------------------------------------------------------
class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_branches_treemap_names_container_children_with_their_type():
    model = Stack()
    with gp.Probe(model) as probe:
        model(torch.randn(3, 6)).sum().backward()
    fig = probe.figures()["branches"]
    (tree,) = [t for t in fig.data if t.type == "treemap"]
    label = dict(zip(tree.ids, tree.labels))
    assert label["layers.0"] == "layers.0 (Sequential)" and label["layers.1.0"] == "layers.1.0 (Linear)"
    assert label["layers"] == "layers (ModuleList)" and label["head"] == "head (Linear)"
    assert label["(root)"] == "Stack" and label["embed"] == "embed (Linear)"
    assert list(tree.ids) == list(probe.to_pandas()["modules"].sort_values("order")["module"].replace("", "(root)"))


# --- the retain_graph demo says what it shows -----------------------------------------------------------
def test_retain_graph_demo_docstring_names_the_findings_it_gives():
    import re

    from gradprobe.tables.schema import FINDING_KIND
    from gradprobe_demos import retain_graph

    probe = retain_graph.main()
    named = {k for k in re.findall(r"`(\w+)`", retain_graph.__doc__) if k in FINDING_KIND}
    assert named == {f.kind for f in probe.findings} == {"retain_graph_unneeded", "retain_graph_avoidable"}
    sev = {f.kind: f.severity for f in probe.findings}
    assert "`retain_graph_unneeded` (warning)" in retain_graph.__doc__ and sev["retain_graph_unneeded"] == "warning"
    assert "`retain_graph_avoidable` (info)" in retain_graph.__doc__ and sev["retain_graph_avoidable"] == "info"


def test_the_same_loss_backward_twice_names_the_first_backward_and_retain_graph():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(RuntimeError, match="second time"):
        with gp.Probe(model) as probe:
            loss = model(torch.randn(3, 6)).sum()  # FORWARD
            loss.backward()  # ONCE
            loss.backward()
    f = _error(probe)
    assert f"the forward at {site_of('FORWARD')} (step 0), which backward 0 at {site_of('ONCE')}" in f.message
    assert "same loss backward twice" in f.message and "`retain_graph=True` to backward 0" in f.message
    assert probe.to_pandas()["backward"]["carried_site"].isna().all()
