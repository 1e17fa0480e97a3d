"""Where flow stops: each kind of cut, its exact line, what it cut off, and the cause it explains."""

import pandas as pd
import pytest
import torch

import gradprobe as gp
from tests.conftest import site_of
from tests.models import MLP


def run_cut(cut):
    """fc1 -> cut -> fc2 -> loss: fc1 gets no gradient because of `cut`."""
    model = MLP()
    with gp.Probe(model) as probe:
        h = torch.relu(model.fc1(torch.randn(4, 6)))
        model.fc2(cut(h)).sum().backward()
    return probe, probe.to_pandas()


def detach(h):
    return h.detach()  # CUT-DETACH


def detach_(h):
    h = h * 1.0
    h.detach_()  # CUT-DETACH_
    return h


def data(h):
    return h.data  # CUT-DATA


def no_grad(h):
    with torch.no_grad():
        return h * 2  # CUT-NO-GRAD


def inference_mode(h):
    with torch.inference_mode():
        out = h * 2  # CUT-INFERENCE
    return out.clone()


def argmax_cast(h):
    return h.argmax(dim=1, keepdim=True).float().expand(-1, 8)  # CUT-ARGMAX


def to_python(h):
    return torch.tensor(h.tolist())  # CUT-TOLIST


@pytest.mark.parametrize("cut, kind, cause, marker", [
    (detach, "detach", "detach", "CUT-DETACH"),
    (detach_, "detach_", "detach", "CUT-DETACH_"),
    (data, "data", "data", "CUT-DATA"),
    (no_grad, "no_grad", "no_grad", "CUT-NO-GRAD"),
    (inference_mode, "no_grad", "no_grad", "CUT-INFERENCE"),
    (argmax_cast, "non_differentiable", "non_differentiable", "CUT-ARGMAX"),
    (to_python, "to_python", "to_python", "CUT-TOLIST"),
])
def test_each_cut_is_recorded_at_its_line_and_explains_the_missing_gradient(cut, kind, cause, marker):
    probe, t = run_cut(cut)
    site = site_of(marker)
    cuts = t["cuts"]
    row = cuts[cuts["site"] == site]
    assert row["kind"].tolist() == [kind]
    assert row["upstream"].iloc[0] == ["fc1.weight", "fc1.bias"]
    params = t["params"].set_index("param")
    assert params.loc["fc1.weight", "status"] == "none"
    assert params.loc["fc1.weight", "cause"] == cause
    assert params.loc["fc1.weight", "site"] == site
    assert params.loc["fc2.weight", "status"] == "flow"
    assert bool(row["effective"].iloc[0]) is (kind != "to_python")  # .tolist() cannot be followed
    msg = [f for f in probe.findings if f.kind == "no_gradient"][0].message
    assert msg.startswith("`fc1.weight` and 1 more received no gradient in backward 0")
    assert site in msg


def test_cut_module_is_the_forward_that_ran_it():
    class Cutter(MLP):
        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)).detach())  # CUT-IN-FORWARD

    model = Cutter()
    with gp.Probe(model) as probe:
        model(torch.randn(2, 6)).sum().backward()
    cut = probe.to_pandas()["cuts"].iloc[0]
    assert cut["site"] == site_of("CUT-IN-FORWARD") and cut["module"] == ""
    (f,) = [f for f in probe.findings if f.site == site_of("CUT-IN-FORWARD")]  # one finding per root cause
    assert f.kind == "no_gradient" and f.severity == "error" and "(in Cutter.forward)" in f.message


def test_loss_that_cannot_backward_gets_an_error_naming_the_cut_and_torch_raises_unchanged():
    model = MLP()
    with gp.Probe(model) as probe:
        loss = model(torch.randn(2, 6)).detach().sum()  # CUT-LOSS
        with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad"):
            loss.backward()
    f = probe.findings[0]
    assert f.kind == "backward_error" and f.severity == "error"
    assert f".detach() at {site_of('CUT-LOSS')}" in f.message
    params = probe.to_pandas()["params"]
    assert set(params["cause"]) == {"detach"}


def test_logging_item_is_a_cut_but_not_effective():
    model = MLP()
    with gp.Probe(model) as probe:
        loss = model(torch.randn(2, 6)).sum()
        loss.backward()
        logged = loss.item()  # CUT-ITEM
    cuts = probe.to_pandas()["cuts"]
    assert cuts["site"].tolist() == [site_of("CUT-ITEM")]
    assert cuts["op"].tolist() == ["item"] and not cuts["effective"].any()
    assert isinstance(logged, float)
    assert not [f for f in probe.findings if f.kind in ("detach_cut", "no_gradient")]


def test_gan_detach_is_info_because_generator_trains_in_its_own_step():
    G, D = MLP(4, 8, 4), MLP(4, 8, 1)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), 0.1), torch.optim.SGD(D.parameters(), 0.1)
    with gp.Probe({"G": G, "D": D}) as probe:
        for _ in range(2):
            fake = G(torch.randn(5, 4))
            d_loss = D(fake.detach()).mean()  # CUT-GAN
            opt_d.zero_grad(); d_loss.backward(); opt_d.step()
            g_loss = -D(fake).mean()
            opt_g.zero_grad(); g_loss.backward(); opt_g.step()
            probe.step()
    t = probe.to_pandas()
    assert t["backward"]["step"].tolist() == [0, 0, 1, 1]
    d_step = t["params"][t["params"]["backward"] == 0].set_index("param")
    assert (d_step.loc[["G.fc1.weight", "G.fc2.bias"], "cause"] == "detach").all()
    cut = [f for f in probe.findings if f.kind == "detach_cut"]
    assert len(cut) == 1 and cut[0].severity == "info" and cut[0].site == site_of("CUT-GAN")
    assert not [f for f in probe.findings if f.kind == "no_gradient"]  # one root cause: the deliberate cut


def test_tag_follows_the_cut_through_later_ops():
    model = MLP()
    emb = torch.nn.Embedding(3, 3)
    with gp.Probe({"m": model, "emb": emb}) as probe:
        idx = model(torch.randn(4, 6)).argmax(dim=1)  # CUT-ROUTE
        out = emb(idx) * 2 + 1
        out.sum().backward()
    t = probe.to_pandas()
    assert t["cuts"]["effective"].tolist() == [True]
    p = t["params"].set_index("param")
    assert p.loc["m.fc1.weight", "cause"] == "non_differentiable"
    assert p.loc["m.fc1.weight", "site"] == site_of("CUT-ROUTE")
    assert p.loc["emb.weight", "status"] == "flow"


def test_a_detached_sample_that_feeds_no_loss_is_not_the_cause():
    """pytorch/examples' DCGAN samples `netG(fixed_noise).detach()` for images after the G step: in the next
    iteration's D-real backward the generator is simply not in the graph (`not_in_graph`), not cut by that
    detach; the deliberate `D(fake.detach())` stays the cause in the D-fake backward."""
    G, D = torch.nn.Linear(4, 6), torch.nn.Linear(6, 1)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    with gp.Probe({"G": G, "D": D}, every=1) as probe:
        for _ in range(3):
            D.zero_grad()
            D(torch.randn(8, 6)).mean().backward()  # D on real data
            fake = G(torch.randn(8, 4))
            D(fake.detach()).mean().backward()  # CUT-GAN-D
            opt_d.step()
            G.zero_grad()
            (-D(fake).mean()).backward()
            opt_g.step()
            sample = G(torch.randn(8, 4)).detach()  # CUT-SAMPLE
            (sample.clamp(-1, 1) * 0.5 + 0.5).mean().item()  # save_image-like ops, outside any graph
    p = probe.to_pandas()["params"]
    g = p[p["param"] == "G.weight"].sort_values("backward")
    per_backward = list(zip(g["status"], g["cause"].astype(object), g["site"].astype(object)))
    real, fake_d, gen = per_backward[3], per_backward[4], per_backward[5]  # second iteration
    assert real[:2] == ("none", "not_in_graph") and pd.isna(real[2])
    assert fake_d == ("none", "detach", site_of("CUT-GAN-D"))
    assert gen[0] == "flow"
    assert site_of("CUT-SAMPLE") not in set(g["site"].dropna())
