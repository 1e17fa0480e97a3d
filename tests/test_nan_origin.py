"""Issue 10 section 3: where the first NaN/Inf came from, on real training with real backwards.

The probe re-captures the step after the first non-finite gradient with per-op checks; the
`nonfinite_grad` finding then names the op, module and line. Training stays bit-identical.
"""

import contextlib
import warnings

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.conftest import site_of
from tests.identical import check_identical, collect

BAD_FROM = 3  # the step from which the model produces a non-finite value


class LogLayer(nn.Module):
    """Finite until `bad` is set, then log(0) = -inf in forward."""

    def __init__(self):
        super().__init__()
        self.bad = False

    def forward(self, x):
        if self.bad:
            x = torch.log((x - x.max()).abs())  # log-inf
        return x


class InfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = LogLayer()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.act(torch.relu(self.fc1(x))))


class InjectNaN(torch.autograd.Function):
    """Identity in forward; NaN gradient in backward when `on`."""

    on = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan") if InjectNaN.on else g


class Poisoned(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(InjectNaN.apply(self.lin(x)))  # inject-line


class NaNBackNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.mid = Poisoned()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.mid(torch.relu(self.fc1(x))))


def train_skipping_nonfinite(model, steps=6, on=None, wrap=None):
    """SGD that skips the update when a gradient is not finite (what GradScaler does without AMP)."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with (wrap(model) if wrap else contextlib.nullcontext()):
        for i in range(steps):
            if on is not None:
                on(i >= BAD_FROM)
            x = torch.randn(16, 6)
            loss = model(x).pow(2).mean()
            loss.backward()
            losses.append(loss.detach().clone())
            if all(torch.isfinite(p.grad).all() for p in model.parameters()):
                opt.step()
            opt.zero_grad()
    return collect(model, opt, losses=losses)


def _set_bad(model):
    def on(flag):
        model.act.bad = flag
    return on


def _nan_finding(probe):
    found = [f for f in probe.findings if f.kind == "nonfinite_grad"]
    assert found, [(f.kind, f.message) for f in probe.findings]
    return found[0]


def test_forward_inf_names_module_op_and_line():
    torch.manual_seed(0)
    model = InfNet()
    with gp.Probe(model) as probe:
        train_skipping_nonfinite(model, on=_set_bad(model))
    num = probe.to_pandas()["numerics"]
    fwd = num[num["phase"] == "forward"]
    assert len(fwd) == 1, num
    row = fwd.iloc[0]
    # the iteration after the first non-finite gradient was re-captured; the skipped updates keep the step
    # (a step ends at an optimizer step), so it is the same step as the finding's
    assert row["step"] == BAD_FROM
    assert row["module"] == "act" and row["op"] == "log" and row["what"] == "inf"
    assert row["inputs"] == "finite"
    assert row["site"] == site_of("log-inf")
    f = _nan_finding(probe)
    assert f.severity == "error" and f.step == BAD_FROM
    assert "forward output of `log`" in f.message and "`act` (LogLayer)" in f.message
    assert site_of("log-inf") in f.message
    assert "still finite" in f.message  # the parameters were not NaN: the update was skipped
    assert not [x for x in probe.findings if x.kind == "nonfinite_weights"]


def test_nan_injected_in_backward_is_the_backward_phase():
    torch.manual_seed(0)
    model = NaNBackNet()

    def on(flag):
        InjectNaN.on = flag

    try:
        with gp.Probe(model) as probe:
            train_skipping_nonfinite(model, on=on)
    finally:
        InjectNaN.on = False
    num = probe.to_pandas()["numerics"]
    assert not (num["phase"] == "forward").any(), num  # forward stayed finite
    bwd = num[num["phase"] == "backward"]
    assert len(bwd) == 1, num
    row = bwd.iloc[0]
    assert row["step"] == BAD_FROM and row["what"] == "nan"
    assert "InjectNaNBackward" in row["op"] and row["module"] == "mid"
    assert row["site"] == site_of("inject-line")
    f = _nan_finding(probe)
    assert "backward of `InjectNaNBackward" in f.message and "`mid`" in f.message


def test_weights_turned_nonfinite_are_said():
    """The optimizer steps with the NaN gradient: the next forward starts from NaN weights."""
    torch.manual_seed(0)
    model = InfNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model) as probe:
        for i in range(6):
            model.act.bad = i == BAD_FROM
            model(torch.randn(16, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    row = probe.to_pandas()["numerics"].iloc[0]
    assert row["step"] == BAD_FROM + 1
    assert row["phase"] == "forward" and row["inputs"] == "nonfinite" and row["module"] == "fc1"
    f = _nan_finding(probe)
    assert "already NaN/Inf" in f.message and "non-finite themselves" in f.message
    assert [x for x in probe.findings if x.kind == "nonfinite_weights"]


def test_nan_run_is_identical_with_and_without_probe():
    def train(wrap):
        torch.manual_seed(0)
        model = InfNet()
        return train_skipping_nonfinite(model, on=_set_bad(model), wrap=wrap)

    probe = check_identical(train)
    assert len(probe.to_pandas()["numerics"]) >= 1


def test_backward_nan_run_is_identical_with_and_without_probe():
    def train(wrap):
        torch.manual_seed(0)
        model = NaNBackNet()

        def on(flag):
            InjectNaN.on = flag
        try:
            return train_skipping_nonfinite(model, on=on, wrap=wrap)
        finally:
            InjectNaN.on = False

    probe = check_identical(train)
    assert (probe.to_pandas()["numerics"]["phase"] == "backward").any()


def test_finite_run_arms_nothing_and_leaves_no_mode():
    torch.manual_seed(0)
    model = InfNet()
    n_modes = torch._C._len_torch_function_stack()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gp.Probe(model) as probe:
            train_skipping_nonfinite(model)
            assert probe.numerics.mode is None and probe.numerics.armed is None
    assert torch._C._len_torch_function_stack() == n_modes
    assert probe.to_pandas()["numerics"].empty
    assert not [f for f in probe.findings if f.kind == "nonfinite_grad"]


def test_capture_comes_off_after_its_step():
    torch.manual_seed(0)
    model = InfNet()
    n_modes = torch._C._len_torch_function_stack()
    with gp.Probe(model) as probe:
        train_skipping_nonfinite(model, steps=8, on=_set_bad(model))
        assert probe.numerics.mode is None and probe.numerics.step is None  # off after its iteration
        assert probe.numerics.captures == 1  # one re-capture: the origin was found
    assert torch._C._len_torch_function_stack() == n_modes
    assert len(probe.to_pandas()["numerics"]) == 1


def test_gradscaler_overflow_stays_info():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch {torch.__version__}: no CPU GradScaler/autocast ({e})")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model) as probe:
        for i in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(4, 6)).float().pow(2).mean()
            if i == 2:
                loss = loss * float("inf")  # overflow, as a too-large scale gives
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert probe.numerics.captures == 0 and probe.to_pandas()["numerics"].empty  # no re-capture for AMP
    kinds = {f.kind: f.severity for f in probe.findings}
    assert kinds.get("amp_skipped_step") == "info"
    assert "nonfinite_grad" not in kinds and "nonfinite_weights" not in kinds


def test_capture_keeps_no_tensor_alive():
    import gc
    import weakref

    torch.manual_seed(0)
    model = InfNet()
    refs = []
    with gp.Probe(model) as probe:
        for i in range(6):
            model.act.bad = i >= BAD_FROM
            x = torch.randn(16, 6)
            h = model.act(torch.relu(model.fc1(x)))
            loss = model.fc2(h).pow(2).mean()
            loss.backward()
            model.zero_grad()
            refs += [weakref.ref(h), weakref.ref(loss)]
            del h, loss
        assert probe.numerics.captures == 1
    gc.collect()
    assert all(r() is None for r in refs)
