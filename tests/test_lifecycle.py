"""The probe never changes training, keeps nothing alive, and removes everything it installed."""

import gc
import weakref

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.models import MLP, TwoHeads


def installed_state(model):
    """Everything a probe could leave behind, as plain comparable values."""
    nnm = torch.nn.modules.module
    import torch.optim.optimizer as optim_mod
    return {
        "forward_pre": len(nnm._global_forward_pre_hooks),
        "forward": len(nnm._global_forward_hooks),
        "opt_pre": len(optim_mod._global_optimizer_pre_hooks),
        "opt_post": len(optim_mod._global_optimizer_post_hooks),
        "tensor_hooks": sum(len(p._backward_hooks or {}) for p in model.parameters()),
        "backward": torch.autograd.backward,
        "grad": torch.autograd.grad,
        "engine": getattr(torch.autograd, "_engine_run_backward", None),
        "function_modes": torch._C._len_torch_function_stack(),
        "saved_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False),
    }


def train(model, opt_cls, probe=None, steps=4):
    torch.manual_seed(1)
    opt = opt_cls(model.parameters(), lr=0.01)
    ctx = probe if probe is not None else torch.enable_grad()
    with ctx:
        for _ in range(steps):
            main, aux = model(torch.randn(8, 6))
            loss = main.pow(2).mean() + aux.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()
                                                                  if p.grad is not None]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_parameters_and_grads_bit_identical_with_and_without_probe(opt_cls):
    torch.manual_seed(0)
    a = TwoHeads()
    b = TwoHeads()
    b.load_state_dict(a.state_dict())
    params_a, grads_a = train(a, opt_cls)
    params_b, grads_b = train(b, opt_cls, gp.Probe(b))
    assert len(grads_a) == len(grads_b) == 6
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


def test_everything_removed_after_normal_exit_and_after_exception():
    model = MLP()
    before = installed_state(model)
    probe = gp.Probe(model)
    with probe:
        assert installed_state(model) != before
        model(torch.randn(2, 6)).sum().backward()
    assert installed_state(model) == before
    with pytest.raises(ValueError, match="boom"):
        with probe:
            model(torch.randn(2, 6)).sum().backward()
            raise ValueError("boom")
    assert installed_state(model) == before
    # and used again later: it records on, then removes everything again
    with probe:
        model(torch.randn(2, 6)).sum().backward()
    assert installed_state(model) == before
    assert probe.to_pandas()["backward"]["backward"].tolist() == [0, 1, 2]


def test_probe_keeps_no_tensor_alive():
    model = MLP()
    probe = gp.Probe(model)
    with probe:
        out = model(torch.randn(2, 6))
        out.sum().backward()
    refs = [weakref.ref(model), weakref.ref(model.fc1.weight), weakref.ref(out)]
    del model, out
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert len(probe.to_pandas()["params"]) == 4  # the records outlive the model


def test_decorator_makes_each_call_one_step_and_exposes_the_probe():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @gp.Probe(model)
    def train_step(x):
        loss = model(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):
        assert isinstance(train_step(torch.randn(2, 6)), float)
    assert isinstance(train_step.probe, gp.Probe)
    t = train_step.probe.to_pandas()
    assert t["backward"]["step"].tolist() == [0, 1, 2]
    assert installed_state(model)["forward"] == 0


def test_optimizer_steps_are_boundaries_unless_probe_step_is_called():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model) as probe:
        for _ in range(3):
            model(torch.randn(2, 6)).sum().backward()
            model(torch.randn(2, 6)).sum().backward()  # gradient accumulation: same step
            opt.step()
            opt.zero_grad()
    assert probe.to_pandas()["backward"]["step"].tolist() == [0, 0, 1, 1, 2, 2]


def test_second_active_probe_raises_a_clear_error():
    model = MLP()
    with gp.Probe(model):
        with pytest.raises(RuntimeError, match="another Probe is already active"):
            with gp.Probe(model):
                pass
        model(torch.randn(2, 6)).sum().backward()  # the first one still works
    assert installed_state(model)["forward"] == 0


@pytest.mark.parametrize("kwargs, error, text", [
    ({"model": "net"}, TypeError, "model must be an nn.Module"),
    ({"model": {"G": 3}}, TypeError, "must map str names to nn.Module"),
    ({"model": None, "track": ["grads", "speed"]}, ValueError, "unknown track"),
    ({"model": None, "every": 0}, ValueError, "every must be a positive int"),
])
def test_wrong_arguments_name_the_fix(kwargs, error, text):
    with pytest.raises(error, match=text):
        gp.Probe(**kwargs)


def test_watch_refuses_what_is_not_a_leaf_tensor():
    probe = gp.Probe(None)
    a = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        probe.watch([1.0], "a")
    with pytest.raises(ValueError, match="watch the leaf it came from"):
        probe.watch(a * 2, "b")
    assert probe.watch(a, "a") is a


def test_empty_run_summary_says_nothing_was_recorded():
    probe = gp.Probe(nn.Linear(2, 2))
    with probe:
        pass
    assert "Nothing was recorded" in probe.summary()
    assert probe.findings == []


def test_every_n_samples_memory_on_detail_steps_and_still_removes_everything():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = installed_state(model)
    with gp.Probe(model, every=2) as probe:
        for _ in range(5):
            model(torch.randn(3, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
        assert installed_state(model)["saved_hooks"] is None  # the step about to begin (5) is not sampled
    assert sorted(probe.to_pandas()["saved"]["step"].unique()) == [0, 2, 4]
    assert installed_state(model) == before
    with gp.Probe(model, every=2) as probe:  # leaving during a step that is not sampled
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
        model(torch.randn(3, 6)).sum().backward()  # step 1: memory paused
        assert installed_state(model)["saved_hooks"] is None
    assert installed_state(model) == before
    assert probe.to_pandas()["saved"]["step"].unique().tolist() == [0]


def test_double_backward_gradient_penalty_unchanged():
    """create_graph=True through saved tensors (WGAN-GP style) gives the same second-order gradients."""
    def run(probe):
        torch.manual_seed(3)
        D = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        x = torch.randn(5, 4, requires_grad=True)
        with probe if probe is not None else torch.enable_grad():
            (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            penalty = ((g.norm(dim=1) - 1) ** 2).mean()
            penalty.backward()
        return [None if p.grad is None else p.grad.clone() for p in D.parameters()]

    plain = run(None)
    probe = gp.Probe(None)
    probed = run(probe)
    assert plain[3] is None and probed[3] is None  # the last bias does not change the input gradient
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], probed[:3]))
    assert probe.to_pandas()["backward"]["api"].tolist() == ["autograd.grad", "tensor.backward"]
