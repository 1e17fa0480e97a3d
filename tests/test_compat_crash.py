"""COMPAT.md section A: a probe never crashes a working program.

Every case is real PyTorch training code that works without a probe (check_identical runs it
without one first). With the probe it must run, train bit-identically, and leave nothing
installed once the `with` block is left (also through an exception).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe as gp
from tests.clean import assert_nothing_installed, snapshot_installed
from tests.identical import assert_same, check_identical, collect
from tests.models import MLP

SCHEDULES = [pytest.param({}, id="default"), pytest.param({"every": 1}, id="every1"),
             pytest.param({"every": 3}, id="every3")]


pytestmark = pytest.mark.usefixtures("isolated")


def identical_and_clean(train, **probe_kwargs):
    """check_identical, then nothing installed remains (models made inside `train` carry no hooks)."""
    made = []

    def tracked(wrap):
        def wrap2(model=None):
            if model is not None:
                made.append(model)
            return wrap(model)
        return train(wrap2)

    before = snapshot_installed()
    probe = check_identical(tracked, **probe_kwargs)
    assert_nothing_installed(before, *made)
    return probe


def sgd_steps(model, opt, steps, make_batch, loss_fn, after=None):
    losses = []
    for i in range(steps):
        x, y = make_batch()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        if after is not None:
            after(i)
    return losses


# ============================================================================ A.1
class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, idx):
        return self.fc(self.emb(idx).mean(1))


WRITES = {
    "emb_weight0_zero": lambda m: m.emb.weight[0].zero_(),
    "init_zeros_slice": lambda m: nn.init.zeros_(m.fc.weight[:, :2]),
    "narrow_copy": lambda m: m.fc.weight.narrow(1, 0, 2).copy_(torch.full((4, 2), 0.25)),
    "t_mul": lambda m: m.fc.weight.t().mul_(0.5),
    "orthogonal": lambda m: nn.init.orthogonal_(m.fc.weight),
}


def _emb_batch():
    return torch.randint(0, 10, (5, 3)), torch.randn(5, 4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("write", list(WRITES))
def test_a1_inplace_write_through_parameter_view_under_no_grad(write, schedule):
    def train(wrap):
        model = EmbNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def rewrite(i):
            if i == 1:
                with torch.no_grad():
                    WRITES[write](model)

        with wrap(model):
            with torch.no_grad():
                WRITES[write](model)
            losses = sgd_steps(model, opt, 4, _emb_batch, F.mse_loss, after=rewrite)
        return collect(model, opt, losses=losses)

    identical_and_clean(train, **schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("observe", ["everything", "container"])
def test_a1_embedding_with_padding_idx_built_inside_probe(observe, schedule):
    def train(wrap):
        holder = nn.Module()
        holder.fc = nn.Linear(8, 4)
        with wrap(None if observe == "everything" else holder):
            holder.emb = nn.Embedding(10, 8, padding_idx=0)  # reset_parameters writes weight[0] under no_grad
            model = EmbNet()
            model.emb, model.fc = holder.emb, holder.fc
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            losses = sgd_steps(model, opt, 4, _emb_batch, F.mse_loss)
        return collect(model, opt, losses=losses)

    kw = dict(schedule)
    if observe == "everything":
        kw["model"] = None
    identical_and_clean(train, **kw)


# ============================================================================ A.2
from torch.func import functional_call, grad, jacrev, vmap  # noqa: E402


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def func_grad(wrap):
    """torch.func.grad of a functional_call loss, added to the ordinary backward's .grad."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    out = []
    with wrap(model):
        for _ in range(4):
            x, y = torch.randn(5, 6), torch.randn(5, 3)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            g = grad(loss_fn)(_params(model), x, y)
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.grad.add_(g[k])
            opt.step()
            out.append(g)
    return collect(model, opt, out=out)


def func_vmap_grad(wrap):
    """DP-SGD style per-sample gradients: vmap(grad(...)), clipped and averaged."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def sample_loss(p, x, y):
        return F.mse_loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    out = []
    with wrap(model):
        for _ in range(4):
            x, y = torch.randn(6, 6), torch.randn(6, 3)
            loss = F.mse_loss(model(x), y)  # logged and backwarded like usual
            opt.zero_grad()
            loss.backward()
            g = per_sample(_params(model), x, y)
            norms = torch.stack([v.flatten(1).norm(dim=1) for v in g.values()]).norm(dim=0)
            scale = (1.0 / norms).clamp(max=1.0)
            for k, p in model.named_parameters():
                p.grad = (g[k] * scale.view(-1, *[1] * (g[k].dim() - 1))).mean(0)
            opt.step()
            out.append(g)
    return collect(model, opt, out=out)


def func_jacrev(wrap):
    """Jacobian regularisation: jacrev of the model wrt its input, in the training loss."""
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    out = []
    with wrap(model):
        for _ in range(4):
            x, y = torch.randn(5, 6), torch.randn(5, 3)
            jac = jacrev(lambda v: model(v))(x[0])
            loss = F.mse_loss(model(x), y) + 0.1 * jac.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pj = jacrev(lambda p: functional_call(model, p, (x,)))(_params(model))
            out.append((jac.detach(), pj))
    return collect(model, opt, out=out)


def func_functional_call(wrap):
    """MAML-style: fast weights from torch.autograd.grad, evaluated with functional_call."""
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    with wrap(model):
        for _ in range(4):
            xs, ys, xq, yq = torch.randn(5, 6), torch.randn(5, 3), torch.randn(5, 6), torch.randn(5, 3)
            params = dict(model.named_parameters())
            inner = F.mse_loss(functional_call(model, params, (xs,)), ys)
            gs = torch.autograd.grad(inner, list(params.values()), create_graph=True)
            fast = {k: p - 0.1 * g for (k, p), g in zip(params.items(), gs)}
            outer = F.mse_loss(functional_call(model, fast, (xq,)), yq)
            opt.zero_grad()
            outer.backward()
            opt.step()
            losses.append(outer.detach())
    return collect(model, opt, losses=losses)


def _grads_batched(wrt):
    def train(wrap):
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        out = []
        with wrap(model):
            for _ in range(4):
                x = torch.randn(4, 6, requires_grad=(wrt == "input"))
                y = model(x)
                eye = torch.eye(y.numel()).view(-1, *y.shape)
                inputs = [x] if wrt == "input" else list(model.parameters())
                jac = torch.autograd.grad(y, inputs, eye, is_grads_batched=True, retain_graph=True)
                loss = y.pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(jac)
        return collect(model, opt, out=out)
    return train


def func_jacobian_vectorize(wrap):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    with wrap(model):
        for _ in range(4):
            x, y = torch.randn(3, 6), torch.randn(3, 3)
            jac = torch.autograd.functional.jacobian(lambda v: model(v), x, vectorize=True)
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(jac)
    return collect(model, opt, out=out)


FUNC_CASES = {
    "grad": func_grad,
    "vmap_grad": func_vmap_grad,
    "jacrev": func_jacrev,
    "functional_call": func_functional_call,
    "is_grads_batched_wrt_input": _grads_batched("input"),
    "is_grads_batched_wrt_params": _grads_batched("params"),
    "jacobian_vectorize": func_jacobian_vectorize,
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", list(FUNC_CASES))
def test_a2_torch_func_inside_probe(case, schedule):
    identical_and_clean(FUNC_CASES[case], **schedule)


@pytest.mark.parametrize("case", ["grad", "vmap_grad", "jacrev"])
def test_a2_NEW_BEHAVIOUR_probe_limit_finding_mentions_torch_func(case):
    # NEW BEHAVIOUR (rewritten probe): a torch.func transform ran inside the probe, so the
    # probe says plainly what it could not see: a `probe_limit` finding mentioning torch.func.
    probe = identical_and_clean(FUNC_CASES[case])
    limits = [f for f in probe.findings if f.kind == "probe_limit"]
    assert any("torch.func" in f.message for f in limits), \
        f"no probe_limit finding mentioning torch.func; findings: {[(f.kind, f.message) for f in probe.findings]}"


# ============================================================================ A.3
class CkptNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.1)) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        if self.how == "reentrant_frozen_input":  # input does not require grad (HF pitfall)
            h = F.pad(x, (0, 10))
        else:
            h = self.inp(x)
        for b in self.blocks:
            if self.how == "save_on_cpu":
                h = b(h)
            else:
                h = checkpoint(b, h, use_reentrant=self.how != "nonreentrant")
        return self.head(h)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("how", ["reentrant", "nonreentrant", "reentrant_frozen_input", "save_on_cpu"])
def test_a3_checkpoint_and_save_on_cpu_every_schedule(how, schedule):
    def train(wrap):
        model = CkptNet(how)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        losses = []
        with wrap(model):
            for _ in range(13):  # past the default schedule's first 10 full-detail steps
                x, y = torch.randn(4, 6), torch.randn(4, 3)
                if how == "save_on_cpu":
                    with torch.autograd.graph.save_on_cpu(pin_memory=False):
                        loss = F.mse_loss(model(x), y)
                else:
                    loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return collect(model, opt, losses=losses)

    identical_and_clean(train, **schedule)


# ============================================================================ A.4
def _compiled_train(backend, fullgraph, warm_before=False):
    def train(wrap):
        torch._dynamo.reset()
        model = MLP()
        cm = torch.compile(model, backend=backend, fullgraph=fullgraph)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        if warm_before:
            losses.append(F.mse_loss(cm(torch.randn(5, 6)), torch.randn(5, 3)).detach())
        with wrap(model):
            for _ in range(3):
                x, y = torch.randn(5, 6), torch.randn(5, 3)
                loss = F.mse_loss(cm(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        torch._dynamo.reset()
        return collect(model, opt, losses=losses)
    return train


@pytest.mark.parametrize("backend,fullgraph,warm", [
    pytest.param("aot_eager", False, False, id="aot_eager"),
    pytest.param("aot_eager", True, False, id="aot_eager-fullgraph"),
    pytest.param("aot_eager", True, True, id="aot_eager-fullgraph-compiled_before_probe"),
    pytest.param("inductor", True, False, id="inductor-fullgraph"),
])
def test_a4_torch_compile(backend, fullgraph, warm):
    # warm up once without any probe: first-time lazy imports (and their one-off warnings)
    # must not land in only one of the two compared runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        m = MLP()
        torch.compile(m, backend=backend, fullgraph=fullgraph)(torch.randn(2, 6)).sum().backward()
        torch._dynamo.reset()
    identical_and_clean(_compiled_train(backend, fullgraph, warm))


# ============================================================================ A.5
class RichNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.bn(self.fc1(x)))))


def _rich_loop(model, opt, steps=4):
    losses, running = [], 0.0
    for i in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        acc = (out.detach().argmax(1) == y).float().mean()
        losses.append((loss.detach(), acc))
    model.eval()
    with torch.no_grad():
        ev = model(torch.randn(8, 6))
    model.train()
    return losses, running, ev


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a5_warnings_as_errors_training_loop(schedule):
    def train(wrap):
        model = RichNet()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with wrap(model):
                losses, running, ev = _rich_loop(model, opt)
        return collect(model, opt, losses=losses, running=running, ev=ev)

    identical_and_clean(train, **schedule)


def test_a5_warnings_as_errors_reading_results():
    torch.manual_seed(0)
    model = RichNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = snapshot_installed(model)
        probe = gp.Probe(model)
        with probe:
            _rich_loop(model, opt)
        assert_nothing_installed(before)
        tables = probe.to_pandas()
        findings = probe.findings
        text = probe.summary()
    assert len(tables["backward"]) == 4
    assert isinstance(findings, list) and isinstance(text, str)


_W_ERROR_SCRIPT = """
import contextlib, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
{ctx}
with ctx:
    for i in range(4):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(i, loss.item())
print("done")
"""


def test_a5_python_W_error_subprocess():
    def run(ctx):
        return subprocess.run([sys.executable, "-W", "error", "-c", _W_ERROR_SCRIPT.format(ctx=ctx)],
                              capture_output=True, text=True, timeout=120)

    plain = run("ctx = contextlib.nullcontext()")
    assert plain.returncode == 0, f"the script fails even without a probe:\n{plain.stderr[-2000:]}"
    probed = run("import gradprobe as gp\nctx = gp.Probe(model)")
    assert probed.returncode == 0, f"python -W error with the probe exited {probed.returncode}:\n{probed.stderr[-3000:]}"
    assert probed.stdout == plain.stdout


# ============================================================================ A.6
def a6_lazy(wrap):
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    losses = []
    with wrap(model):
        model(torch.randn(2, 6))  # materialise the lazy parameters (as the docs advise), inside the probe
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = sgd_steps(model, opt, 4, lambda: (torch.randn(5, 6), torch.randn(5, 3)), F.mse_loss)
    return collect(model, opt, losses=losses)


class SparseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(self.emb(idx).mean(1))


def a6_sparse(wrap):
    model = SparseNet()
    opts = [torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01),
            torch.optim.Adam(model.fc.parameters(), lr=0.01)]
    losses = []
    with wrap(model):
        for _ in range(4):
            idx, y = torch.randint(0, 50, (6, 4)), torch.randn(6, 3)
            loss = F.mse_loss(model(idx), y)
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            losses.append(loss.detach())
    return collect(model, opts, losses=losses)


def a6_complex(wrap):
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.cfloat), nn.Linear(6, 2, dtype=torch.cfloat))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    with wrap(model):
        for _ in range(4):
            x = torch.randn(5, 4, dtype=torch.cfloat)
            loss = model(x).abs().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return collect(model, opt, losses=losses)


def _low_precision(dtype):
    def train(wrap):
        model = MLP().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with wrap(model):
            losses = sgd_steps(model, opt, 4, lambda: (torch.randn(5, 6, dtype=dtype), torch.randn(5, 3)),
                               lambda out, y: F.mse_loss(out.float(), y))
        return collect(model, opt, losses=losses)
    return train


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 20, bias=False)
        self.decoder.weight = self.encoder.weight

    def forward(self, idx):
        return self.decoder(torch.tanh(self.mid(self.encoder(idx))))


def a6_tied(wrap):
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with wrap(model):
        losses = sgd_steps(model, opt, 4, lambda: (torch.randint(0, 20, (4, 5)), torch.randint(0, 20, (4, 5))),
                           lambda out, y: F.cross_entropy(out.reshape(-1, 20), y.reshape(-1)))
    return collect(model, opt, losses=losses)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(torch.tanh(x @ self.w) @ self.w))


def a6_twice(wrap):
    model = Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with wrap(model):
        losses = sgd_steps(model, opt, 4, lambda: (torch.randn(5, 6), torch.randn(5, 3)), F.mse_loss)
    return collect(model, opt, losses=losses)


class Tiny(nn.Module):
    def __init__(self, n=2000):
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(()) * 0.01) for _ in range(n))

    def forward(self, x):
        return x @ torch.stack(list(self.ps)).unsqueeze(1)


def a6_tiny(wrap):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with wrap(model):
        losses = sgd_steps(model, opt, 3, lambda: (torch.randn(4, 2000), torch.randn(4, 1)), F.mse_loss)
    return collect(model, opt, losses=losses)


A6_CASES = {
    "lazy_linear": a6_lazy,
    "sparse_embedding_sparseadam": a6_sparse,
    "complex_cfloat": a6_complex,
    "bf16": _low_precision(torch.bfloat16),
    "fp16": _low_precision(torch.float16),
    "tied_weights": a6_tied,
    "parameter_used_twice": a6_twice,
    "2000_tiny_parameters": a6_tiny,
}


@pytest.mark.parametrize("case", list(A6_CASES))
def test_a6_unusual_parameters_identical(case):
    identical_and_clean(A6_CASES[case])


def test_a6_lazy_linear_parameters_recorded_once_materialised():
    probe = identical_and_clean(a6_lazy)
    params = probe.to_pandas()["params"]
    for name in ("0.weight", "0.bias"):
        rows = params[params["param"] == name]
        assert len(rows) > 0, f"no params rows for the materialised lazy parameter {name}"
        assert (rows["status"] == "flow").all(), rows[["step", "status", "cause"]].to_string()


# ============================================================================ A.7
class Boom(Exception):
    pass


class Flaky(MLP):
    fail = False

    def forward(self, x):
        if self.fail:
            raise self.fail("raised in forward")
        return super().forward(x)


WHERE = ["forward", "in_backward", "after_backward", "optimizer_step", "between_steps"]
# backward calls that completed before the error (the error comes at iteration 2)
COMPLETED = {"forward": 2, "in_backward": 2, "after_backward": 3, "optimizer_step": 3, "between_steps": 3}


def _loop_raising(model, opt, where, exc, at=2):
    for i in range(5):
        x, y = torch.randn(5, 6), torch.randn(5, 3)
        model.fail = exc if (where == "forward" and i == at) else False
        out = model(x)
        if where == "in_backward" and i == at:
            def hook(g):
                raise exc("raised in a tensor hook during backward")
            out.register_hook(hook)
        loss = F.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        if where == "after_backward" and i == at:
            raise exc("raised after backward")
        if where == "optimizer_step" and i == at:
            def pre(o, args, kwargs):
                raise exc("raised in optimizer.step")
            opt.register_step_pre_hook(pre)
        opt.step()
        if where == "between_steps" and i == at:
            raise exc("raised between steps")


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("where", WHERE)
def test_a7_exception_in_loop_clean_exit_records_kept(where, exc):
    # the same loop without a probe raises the same way
    torch.manual_seed(0)
    m0 = Flaky()
    with pytest.raises(exc):
        _loop_raising(m0, torch.optim.SGD(m0.parameters(), lr=0.05), where, exc)

    torch.manual_seed(0)
    model = Flaky()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = snapshot_installed(model)
    probe = gp.Probe(model)
    with pytest.raises(exc):
        with probe:
            _loop_raising(model, opt, where, exc)
    assert_nothing_installed(before)
    for a, b in zip(m0.parameters(), model.parameters()):
        assert torch.equal(a, b)
    bw = probe.to_pandas()["backward"]
    assert len(bw) >= COMPLETED[where], bw.to_string()
    assert set(range(COMPLETED[where])) <= set(bw["backward"]), bw.to_string()
    params = probe.to_pandas()["params"]
    assert (params[params["backward"] == 0]["status"] == "flow").all()


def test_a7_probe_entered_twice_in_a_row():
    def train(wrap):
        outer = snapshot_installed()
        model = MLP()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        ctx = wrap(model)
        batch = lambda: (torch.randn(5, 6), torch.randn(5, 3))  # noqa: E731
        with ctx:
            l1 = sgd_steps(model, opt, 2, batch, F.mse_loss)
        assert_nothing_installed(outer, model)
        with ctx:
            l2 = sgd_steps(model, opt, 2, batch, F.mse_loss)
        return collect(model, opt, losses=l1 + l2)

    probe = identical_and_clean(train)
    assert sorted(probe.to_pandas()["backward"]["backward"]) == [0, 1, 2, 3]


def test_a7_probe_nested_in_itself():
    def train(wrap):
        model = MLP()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        ctx = wrap(model)
        batch = lambda: (torch.randn(5, 6), torch.randn(5, 3))  # noqa: E731
        with ctx:
            l1 = sgd_steps(model, opt, 1, batch, F.mse_loss)
            with ctx:
                l2 = sgd_steps(model, opt, 2, batch, F.mse_loss)
            l3 = sgd_steps(model, opt, 1, batch, F.mse_loss)  # still observed after the inner exit
        return collect(model, opt, losses=l1 + l2 + l3)

    probe = identical_and_clean(train)
    assert sorted(probe.to_pandas()["backward"]["backward"]) == [0, 1, 2, 3]


def test_a7_decorated_function_called_recursively():
    def run(decorate):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        probe = gp.Probe(model)

        def train_step(x, y, depth):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if depth:
                return [loss.detach()] + step_fn(x, y, depth - 1)
            return [loss.detach()]

        step_fn = probe(train_step) if decorate else train_step
        losses = [step_fn(torch.randn(5, 6), torch.randn(5, 3), 2) for _ in range(3)]
        return probe, model, collect(model, opt, losses=losses)

    before = snapshot_installed()
    _, _, ref = run(False)
    probe, model, got = run(True)
    assert_nothing_installed(before, model)
    assert_same(ref, got)
    bw = probe.to_pandas()["backward"]
    assert len(bw) == 9
    assert sorted(set(bw["step"])) == [0, 1, 2], bw[["step", "backward"]].to_string()


@pytest.mark.parametrize("abandon", ["close", "del"])
def test_a7_generator_loop_abandoned_midway(abandon):
    def loop(model, opt, ctx):
        with ctx:
            for _ in range(10):
                loss = F.mse_loss(model(torch.randn(5, 6)), torch.randn(5, 3))
                opt.zero_grad()
                loss.backward()
                opt.step()
                yield loss.item()

    def run(make_ctx):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ctx = make_ctx(model)
        gen = loop(model, opt, ctx)
        losses = [next(gen) for _ in range(3)]
        if abandon == "close":
            gen.close()
        else:
            del gen
            gc.collect()
        return ctx, model, collect(model, opt, losses=losses)

    import contextlib
    before = snapshot_installed()
    _, _, ref = run(lambda m: contextlib.nullcontext())
    probe, model, got = run(gp.Probe)
    assert_nothing_installed(before, model)
    assert_same(ref, got)
    assert len(probe.to_pandas()["backward"]) == 3


class NoisyData(torch.utils.data.Dataset):
    """Does torch work in the worker processes."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 6, generator=g)
        self.y = torch.randn(32, 3, generator=g)

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return self.x[i] * 2 + torch.sin(self.x[i]), self.y[i]


def test_a7_dataloader_workers():
    def train(wrap):
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = []
        with wrap(model):
            for _ in range(2):
                loader = torch.utils.data.DataLoader(NoisyData(), batch_size=8, shuffle=True, num_workers=2)
                for x, y in loader:
                    loss = F.mse_loss(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(loss.detach())
        return collect(model, opt, losses=losses)

    probe = identical_and_clean(train)
    assert len(probe.to_pandas()["backward"]) == 8
