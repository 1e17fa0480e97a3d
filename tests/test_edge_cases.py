"""Training loops that are less common but real: closures, failing steps, optimizers in hooks,
gradient penalties, modules returning parameters, shape-only ops."""

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.models import MLP


def test_lbfgs_closure_forward_and_backward_are_recorded():
    model = MLP()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=3)
    x, y = torch.randn(8, 6), torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with gp.Probe(model) as probe:
        opt.step(closure)
        opt.step(closure)
    t = probe.to_pandas()
    assert len(t["backward"]) >= 4  # every closure call is a backward
    assert set(t["params"]["status"]) == {"flow"}
    assert t["backward"]["step"].tolist()[-1] == 1


class FailsOnce(torch.optim.SGD):
    failed = False

    def step(self, closure=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("step failed")
        return super().step(closure)


def test_a_failing_optimizer_step_does_not_silence_the_probe():
    model = MLP()
    opt = FailsOnce(model.parameters(), lr=0.1)
    with gp.Probe(model) as probe:
        for i in range(3):
            loss = model(torch.randn(2, 6)).sum()
            loss.backward()
            if i == 0:
                with pytest.raises(RuntimeError, match="step failed"):
                    opt.step()  # raises after the probe's pre-hook, before its post-hook
                opt.zero_grad()
                continue
            h = model.fc1(torch.randn(2, 6)).detach()  # CUT-AFTER-FAIL
            opt.step()
            opt.zero_grad()
    t = probe.to_pandas()
    assert len(t["backward"]) == 3
    assert t["cuts"]["kind"].tolist().count("detach") == 2  # the mode came back after the failed step
    assert h.requires_grad is False


def test_optimizer_in_a_post_accumulate_hook_still_counts_as_flow():
    model = nn.Linear(4, 2)  # weight 8 and bias 2 elements: measured after the backward
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def step_now(p):
        opts[p].step()
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_now)
    with gp.Probe(model) as probe:
        model(torch.randn(3, 4)).sum().backward()
    params = probe.to_pandas()["params"]
    assert params["status"].tolist() == ["flow", "flow"]
    assert not [f for f in probe.findings if f.kind == "no_gradient"]


def test_gradient_penalty_is_not_told_to_drop_create_graph():
    D = MLP(4, 8, 1)
    with gp.Probe(D) as probe:
        x = torch.randn(5, 4, requires_grad=True)
        (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
        ((g.norm(dim=1) - 1) ** 2).mean().backward()
    assert not [f for f in probe.findings if f.kind == "retain_graph_unneeded"]


def test_shape_only_ops_are_not_cuts_and_a_module_returning_a_parameter_leaves_no_hook():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pe = nn.Parameter(torch.randn(3))

        def forward(self):
            return self.pe

    pos = Positional()
    with gp.Probe(pos) as probe:
        for _ in range(3):
            out = pos()
            mask = torch.zeros_like(out)
            (out + mask).sum().backward()
    assert probe.to_pandas()["cuts"].empty
    assert not pos.pe._backward_hooks
    assert set(probe.to_pandas()["params"]["status"]) == {"flow"}


from torch.autograd import grad as grad_bound_early  # noqa: E402  bound before any probe exists

from tests.identical import check_identical, collect  # noqa: E402


@pytest.mark.parametrize("track", [("grads",), ("cuts",), ("memory",), ("grads", "cuts", "memory")])
def test_grad_imported_before_the_probe_is_seen_with_every_track(track):
    model = MLP()
    with gp.Probe(model, track=track) as probe:
        (g,) = grad_bound_early(model(torch.randn(3, 6)).sum(), [model.fc1.weight])
    bw = probe.to_pandas()["backward"]
    assert bw["api"].tolist() == ["autograd.grad"]
    assert g.shape == model.fc1.weight.shape


class Nest(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = Nest(depth - 1) if depth > 1 else None

    def forward(self, x):
        x = torch.tanh(self.lin(x))
        return self.inner(x) if self.inner is not None else x


def test_deep_nesting_of_200_modules_trains_identically_and_names_the_deepest():
    def train(wrap):
        model = Nest(200)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with wrap(model):
            for _ in range(2):
                model(torch.randn(2, 4)).pow(2).sum().backward()
                opt.step()
                opt.zero_grad()
        return collect(model, opt)

    probe = check_identical(train, every=1)
    params = probe.to_pandas()["params"]
    deepest = ".".join(["inner"] * 199) + ".lin.weight"
    assert set(params.loc[params["param"] == deepest, "status"]) == {"flow"}
