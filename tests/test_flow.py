"""Gradient flow per backward: statuses, norms of this backward's contribution, modules, naming."""

import math

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.conftest import site_of
from tests.models import MLP, TwoHeads


def by_param(df, backward=None):
    if backward is not None:
        df = df[df["backward"] == backward]
    return {r.param: r for r in df.itertuples()}


def test_each_status_and_cause_is_named_per_parameter():
    model = TwoHeads()
    model.trunk.requires_grad_(False)
    with gp.Probe(model) as probe:
        main, aux = model(torch.randn(4, 6))
        loss = main.sum() + 0.0 * aux.sum()  # aux gets exactly zero gradient
        loss.backward()
    rows = by_param(probe.to_pandas()["params"])
    status = {p: r.status for p, r in rows.items()}
    assert status == {
        "trunk.weight": "frozen", "trunk.bias": "frozen",
        "heads.main.weight": "flow", "heads.main.bias": "flow",
        "heads.aux.weight": "zero", "heads.aux.bias": "zero",
        "unused.weight": "none", "unused.bias": "none",
    }
    assert rows["unused.weight"].cause == "not_used"
    assert rows["heads.aux.weight"].grad_norm == 0.0
    # d(sum)/d(bias_j) = 4 (batch of 4) for each of 3 outputs: norm sqrt(3 * 4**2)
    assert rows["heads.main.bias"].grad_norm == pytest.approx(math.sqrt(3 * 4**2))


def test_not_in_graph_when_module_ran_but_output_unused():
    model = TwoHeads()
    with gp.Probe(model) as probe:
        main, aux = model(torch.randn(4, 6))
        main.sum().backward()
    rows = by_param(probe.to_pandas()["params"])
    assert rows["heads.aux.weight"].status == "none"
    assert rows["heads.aux.weight"].cause == "not_in_graph"
    assert rows["unused.bias"].cause == "not_used"
    findings = [f for f in probe.findings if f.kind == "no_gradient"]
    assert {tuple(f.params) for f in findings} == {("heads.aux.weight", "heads.aux.bias"),
                                                    ("unused.weight", "unused.bias")}
    assert all(f.severity == "error" for f in findings)


def test_norm_is_the_gradient_the_optimizer_would_step_with_after_each_backward():
    """One policy for every tensor: `.grad` right after that backward (accumulation included)."""
    model = MLP()
    x1, x2 = torch.randn(5, 6), torch.randn(5, 6)
    after = []
    with gp.Probe(model) as probe:
        model(x1).sum().backward()
        after.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model(x2).pow(2).sum().backward()  # .grad accumulates
        after.append({n: p.grad.clone() for n, p in model.named_parameters()})
    params = probe.to_pandas()["params"]
    for b in (0, 1):
        rows = by_param(params, backward=b)
        for name, g in after[b].items():
            assert rows[name].grad_norm == pytest.approx(torch.linalg.vector_norm(g).item(), rel=1e-6)
    assert not torch.equal(after[0]["fc2.bias"], after[1]["fc2.bias"])


def test_module_status_rolls_up_and_output_grad_norm_is_measured():
    model = TwoHeads()
    x = torch.randn(4, 6)
    with gp.Probe(model) as probe:
        main, aux = model(x)
        (main ** 2).sum().backward()
    mods = probe.to_pandas()["modules"].set_index("module")
    assert mods.loc["heads", "status"] == "flow"  # a container summarises its children ...
    assert mods.loc["heads.aux", "status"] == "none"  # ... and the branch view shows which got nothing
    assert mods.loc["heads", "params_none"] == 2 and mods.loc["heads", "params_flow"] == 2
    assert mods.loc["unused", "status"] == "none"
    assert mods.loc["", "type"] == "TwoHeads" and mods.loc["heads.main", "parent"] == "heads"
    # gradient arriving at heads.main's output is d(sum main^2)/d main = 2 * main
    expected = torch.linalg.vector_norm(2 * main.detach()).item()
    assert mods.loc["heads.main", "grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert math.isnan(mods.loc["heads.aux", "grad_norm"])


def test_nonfinite_first_in_backward_order():
    model = MLP()
    with gp.Probe(model) as probe:
        out = model(torch.randn(3, 6))
        (out * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    rows = by_param(probe.to_pandas()["params"])
    assert {p: r.status for p, r in rows.items()} == {p: "nonfinite" for p in rows}
    f = [f for f in probe.findings if f.kind == "nonfinite_grad"]
    assert len(f) == 1 and f[0].params == ["fc2.bias"] and f[0].step == 0  # fc2.bias gets its grad first


def test_autograd_grad_rows_only_for_requested_parameters():
    model = MLP()
    with gp.Probe(model) as probe:
        loss = model(torch.randn(3, 6)).sum()
        torch.autograd.grad(loss, [model.fc2.weight])
    t = probe.to_pandas()
    assert t["params"]["param"].tolist() == ["fc2.weight"]
    assert t["params"]["status"].tolist() == ["flow"]
    assert t["backward"]["api"].tolist() == ["autograd.grad"]
    assert model.fc2.weight.grad is None  # autograd.grad does not accumulate, and neither does the probe


def test_watch_names_a_loose_leaf_and_model_none_names_the_rest():
    a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with gp.Probe(None) as probe:
        probe.watch(a, "a")
        b = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)  # LEAF-B
        lin = nn.Linear(3, 1)
        (lin(a * b)).sum().backward()
    rows = by_param(probe.to_pandas()["params"])
    assert set(rows) == {"a", site_of("LEAF-B").join(["tensor@", ""]), "Linear.weight", "Linear.bias"}
    assert all(r.status == "flow" for r in rows.values())


def test_every_n_keeps_totals_each_step_and_detail_every_n():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, every=2) as probe:
        for _ in range(5):
            model(torch.randn(3, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
    t = probe.to_pandas()
    assert sorted(t["params"]["step"].unique()) == [0, 2, 4]
    assert t["backward"]["step"].tolist() == [0, 1, 2, 3, 4]
    assert t["backward"]["params_flow"].tolist() == [4] * 5


def test_a_finding_made_from_sampled_steps_says_so():
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model, every=5) as probe:
        for _ in range(10):
            main, aux = model(torch.randn(3, 6))
            main.sum().backward()
            opt.step()
            opt.zero_grad()
    t = probe.to_pandas()
    assert t["backward"]["params_none"].tolist() == [4] * 10  # arrival is checked every step
    f = [f for f in probe.findings if f.kind == "no_gradient"][0]
    assert "Seen in 2 sampled steps of 10; whether a gradient arrived was checked in all 10" in f.message
