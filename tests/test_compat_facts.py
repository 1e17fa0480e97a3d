"""COMPAT.md C.1-C.8: the probe never states a wrong fact, checked on real training code.

Each test asserts one fact of the contract: which parameter, which status per backward, which cause,
which line (site_of), which norm value.
"""

import contextlib
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe as gp
from tests.conftest import site_of
from tests.identical import check_identical, collect
from tests.models import MLP

def by_param(df, backward=None):
    if backward is not None:
        df = df[df["backward"] == backward]
    return {r.param: r for r in df.itertuples()}


def status_table(probe):
    """{backward: {param: status}} from the params table."""
    out = {}
    for r in probe.to_pandas()["params"].itertuples():
        out.setdefault(int(r.backward), {})[r.param] = r.status
    return out


def steps_of_backwards(probe):
    return [int(s) for s in probe.to_pandas()["backward"].sort_values("backward")["step"]]


def no_gradient(probe):
    return [f for f in probe.findings if f.kind == "no_gradient"]


def assert_norm(got, g, what=""):
    """`got` is the norm of gradient `g` (rel 1e-6), computed in g's precision or in double: a float32
    reduction over ~1e5 elements may itself be ~2e-6 off the exact value."""
    wide = g.to(torch.complex128 if g.is_complex() else torch.float64)
    refs = (torch.linalg.vector_norm(g).item(), torch.linalg.vector_norm(wide).item())
    assert any(got == pytest.approx(r, rel=1e-6) for r in refs), (what, got, refs)


def gan_pair(nz=4, d=6):
    g = nn.Sequential(nn.Linear(nz, 8), nn.ReLU(), nn.Linear(8, d))
    dis = nn.Sequential(nn.Linear(d, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    return g, dis


# ---------------------------------------------------------------- C.1 requires_grad toggled during the run


def test_c1_progressive_unfreezing_status_per_backward():
    model = MLP()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 6)
    with gp.Probe(model, every=1) as probe:
        for i in range(5):
            if i == 3:
                model.fc1.requires_grad_(True)  # unfreeze after 3 backwards
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    st = status_table(probe)
    assert sorted(st) == [0, 1, 2, 3, 4]
    for b in range(5):
        want = "frozen" if b < 3 else "flow"
        assert st[b]["fc1.weight"] == want and st[b]["fc1.bias"] == want, (b, st[b])
        assert st[b]["fc2.weight"] == "flow" and st[b]["fc2.bias"] == "flow", (b, st[b])
    assert not no_gradient(probe), [f.message for f in no_gradient(probe)]


def _toggle(optimizers, active):
    """Lightning's toggle_optimizer: only the active optimizer's parameters require grad."""
    saved = {}
    for o in optimizers:
        for group in o.param_groups:
            for p in group["params"]:
                saved[p] = p.requires_grad
                p.requires_grad_(o is active)
    return saved


def _untoggle(saved):
    for p, rg in saved.items():
        p.requires_grad_(rg)


def test_c1_manual_gan_toggle_optimizer_no_false_none():
    G, D = gan_pair()
    optG = torch.optim.Adam(G.parameters(), lr=1e-3)
    optD = torch.optim.Adam(D.parameters(), lr=1e-3)
    real = torch.randn(8, 6)
    with gp.Probe({"G": G, "D": D}, every=1) as probe:
        for i in range(3):
            # D step: G's parameters are toggled off
            state = _toggle([optG, optD], optD)
            fake = G(torch.randn(8, 4))
            errD = nn.functional.softplus(-D(real)).mean() + nn.functional.softplus(D(fake)).mean()
            errD.backward()
            optD.step()
            optD.zero_grad()
            _untoggle(state)
            # G step: D's parameters are toggled off
            state = _toggle([optG, optD], optG)
            errG = nn.functional.softplus(-D(G(torch.randn(8, 4)))).mean()
            errG.backward()
            optG.step()
            optG.zero_grad()
            _untoggle(state)
    st = status_table(probe)
    assert sorted(st) == list(range(6))
    g_names = {f"G.{n}" for n, _ in G.named_parameters()}
    d_names = {f"D.{n}" for n, _ in D.named_parameters()}
    for b in range(6):
        d_step = b % 2 == 0
        assert set(st[b]) == g_names | d_names
        for n in g_names:
            assert st[b][n] == ("frozen" if d_step else "flow"), (b, n, st[b][n])
        for n in d_names:
            assert st[b][n] == ("flow" if d_step else "frozen"), (b, n, st[b][n])
    assert not no_gradient(probe), [f.message for f in no_gradient(probe)]


# ---------------------------------------------------------------- C.2 one norm policy


def big_small_model():
    # 0.weight: 300 x 300 = 90,000 elements (> 65,536); 2.weight: 2 x 300 = 600 elements
    return nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 2))


def test_c2_norm_reflects_user_hook_on_big_and_small_parameter():
    model = big_small_model()
    assert model[0].weight.numel() > 65536 and model[2].weight.numel() < 65536
    model[0].weight.register_hook(lambda g: g * 3)
    model[2].weight.register_hook(lambda g: g * 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with gp.Probe(model, every=1) as probe:
        for i in range(3):
            model(torch.randn(4, 300)).pow(2).mean().backward()
            expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
    params = probe.to_pandas()["params"]
    for b, exp in enumerate(expected):
        rows = by_param(params, backward=b)
        for n, g in exp.items():
            assert_norm(rows[n].grad_norm, g, (b, n))


def test_c2_norm_under_accumulation_is_the_accumulated_grad():
    model = big_small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with gp.Probe(model, every=1) as probe:
        for step in range(2):
            for micro in range(2):
                (model(torch.randn(4, 300)).pow(2).mean() / 2).backward()
                expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
    params = probe.to_pandas()["params"]
    assert sorted(params["backward"].unique()) == [0, 1, 2, 3]
    for b, exp in enumerate(expected):
        rows = by_param(params, backward=b)
        for n, g in exp.items():
            assert_norm(rows[n].grad_norm, g, (b, n))


def test_c2_autograd_grad_norm_is_of_the_returned_gradient():
    model = big_small_model()
    names = [n for n, _ in model.named_parameters()]
    with gp.Probe(model, every=1) as probe:
        model(torch.randn(4, 300)).sum().backward()  # .grad now holds something else
        loss = model(torch.randn(4, 300)).pow(2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
    rows = by_param(probe.to_pandas()["params"], backward=1)
    for n, g in zip(names, grads):
        assert_norm(rows[n].grad_norm, g, n)


# ---------------------------------------------------------------- C.3 complex parameters


class ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat))

    def forward(self, x):
        return x.to(torch.cfloat) @ self.w


def test_c3_complex_norm_is_vector_norm_of_complex_grad_and_no_warning():
    model = ComplexNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gp.Probe(model, every=1) as probe:
            model(torch.randn(5, 4)).abs().pow(2).sum().backward()
    g = model.w.grad
    assert g.imag.abs().max() > 0 and g.real.abs().max() > 0
    row = by_param(probe.to_pandas()["params"])["w"]
    assert row.status == "flow"
    assert_norm(row.grad_norm, g, "w")
    assert row.grad_norm != pytest.approx(torch.linalg.vector_norm(g.real).item(), rel=1e-3)


def test_c3_purely_imaginary_gradient_is_flow():
    model = ComplexNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gp.Probe(model, every=1) as probe:
            model.w.imag.sum().backward()
    g = model.w.grad
    assert torch.all(g.real == 0) and torch.all(g.imag != 0)  # the premise: purely imaginary
    row = by_param(probe.to_pandas()["params"])["w"]
    assert row.status == "flow"
    assert_norm(row.grad_norm, g, "w")
    assert not no_gradient(probe)


# ---------------------------------------------------------------- C.4 AMP on CPU


def cpu_scaler(**kw):
    try:
        scaler = torch.amp.GradScaler("cpu", **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch {torch.__version__}: no CPU GradScaler/autocast ({e})")
    return scaler


def amp_loop(model, opt, scaler, steps, record=None, overflow_at=None):
    for i in range(steps):
        x = torch.randn(4, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        if i == overflow_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if record is not None:
            scaler.unscale_(opt)
            record.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def test_c4_amp_grad_norm_is_unscaled():
    cpu_scaler()
    # reference run without the probe: norms after scaler.unscale_
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = []
    amp_loop(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**16), 3, record=reference)
    # probed run: the plain scaler.step path, no unscale_ by the user
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, every=1) as probe:
        amp_loop(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**16), 3)
    params = probe.to_pandas()["params"]
    for b, exp in enumerate(reference):
        rows = by_param(params, backward=b)
        for n, v in exp.items():
            assert rows[n].grad_norm == pytest.approx(v, rel=1e-5), (b, n, rows[n].grad_norm, v)


def test_c4_amp_overflow_is_a_skipped_step_not_an_error():
    scaler = cpu_scaler(init_scale=2.0**16)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model) as probe:
        amp_loop(model, opt, scaler, 4, overflow_at=2)
    assert scaler.get_scale() == 2.0**15  # the premise: the scaler skipped exactly one step
    skipped = [f for f in probe.findings if f.kind == "amp_skipped_step"]
    assert len(skipped) == 1, [(f.kind, f.message) for f in probe.findings]
    assert skipped[0].severity == "info" and skipped[0].step == 2
    assert "GradScaler" in skipped[0].message and "2" in skipped[0].message
    assert not [f for f in probe.findings if f.kind == "nonfinite_grad"]
    assert steps_of_backwards(probe) == [0, 1, 2, 3]  # the skipped step still ends its step


def test_c4_real_nan_without_scaler_is_nonfinite_error():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model) as probe:
        for i in range(2):
            x = torch.randn(4, 6)
            if i == 1:
                x[0, 0] = float("nan")
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    errors = [f for f in probe.findings if f.kind == "nonfinite_grad"]
    assert errors and all(f.severity == "error" for f in errors)
    assert errors[0].step == 1
    assert not [f for f in probe.findings if f.kind == "amp_skipped_step"]


def _shape(v):
    if isinstance(v, str):
        return tuple(int(s) for s in v.split("x")) if v else ()
    return tuple(int(s) for s in v)


def test_c4_autocast_weight_copies_are_cast_not_activation():
    cpu_scaler()
    # batch 4; activations 4x6, 4x8, 4x5: the weight copies 5x8 and 3x5 (saved transposed) are unique shapes
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    with gp.Probe(model, every=1) as probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(4, 6))
        out.float().sum().backward()
    saved = probe.to_pandas()["saved"]
    weight_shapes = {(5, 8), (8, 5), (3, 5), (5, 3)}
    is_copy = saved["shape"].map(lambda v: _shape(v) in weight_shapes) & saved["dtype"].astype(str).str.contains(
        "bfloat16")
    copies = saved[is_copy]
    assert set(copies["module"]) == {"2", "4"}, copies  # layer 0's weight is not needed: its input needs no grad
    assert (copies["kind"] == "cast").all(), copies[["module", "op", "kind", "shape"]]
    assert (saved["kind"] == "cast").any()
    assert not ((saved["kind"] == "activation") & is_copy).any()


# ---------------------------------------------------------------- C.5 steps are iterations


def dcgan_iteration(G, D, optG, optD, real, bce):
    ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
    optD.zero_grad()
    errD_real = bce(D(real), ones)
    errD_real.backward()
    fake = G(torch.randn(real.shape[0], 4))
    errD_fake = bce(D(fake.detach()), zeros)
    errD_fake.backward()
    optD.step()
    optG.zero_grad()
    errG = bce(D(fake), ones)
    errG.backward()
    optG.step()


def test_c5_gan_one_step_per_iteration_and_every_2_samples_both_halves():
    G, D = gan_pair()
    optG = torch.optim.Adam(G.parameters(), lr=1e-3)
    optD = torch.optim.Adam(D.parameters(), lr=1e-3)
    real, bce = torch.randn(8, 6), nn.BCEWithLogitsLoss()
    with gp.Probe({"G": G, "D": D}, every=2) as probe:
        for i in range(6):
            dcgan_iteration(G, D, optG, optD, real, bce)
    assert steps_of_backwards(probe) == [s for s in range(6) for _ in range(3)]
    assert probe.to_pandas()["backward"]["step"].max() == 5
    params = probe.to_pandas()["params"]
    names = {f"G.{n}" for n, _ in G.named_parameters()} | {f"D.{n}" for n, _ in D.named_parameters()}
    sampled = sorted(params["step"].unique())
    assert {0, 2, 4} <= set(sampled), sampled
    for s in sampled:
        assert set(params[params["step"] == s]["param"]) == names, s


def test_c5_first_iteration_three_backwards_two_optimizers_is_step_0():
    G, D = gan_pair()
    optG = torch.optim.SGD(G.parameters(), lr=1e-2)
    optD = torch.optim.SGD(D.parameters(), lr=1e-2)
    real, bce = torch.randn(8, 6), nn.BCEWithLogitsLoss()
    with gp.Probe({"G": G, "D": D}) as probe:
        for i in range(2):
            dcgan_iteration(G, D, optG, optD, real, bce)
    assert steps_of_backwards(probe) == [0, 0, 0, 1, 1, 1]


def test_c5_wgan_critic_steps_one_step_per_generator_step():
    G, D = gan_pair()
    optG = torch.optim.RMSprop(G.parameters(), lr=5e-5)
    optD = torch.optim.RMSprop(D.parameters(), lr=5e-5)
    real = torch.randn(8, 6)
    with gp.Probe({"G": G, "D": D}) as probe:
        for gen_step in range(3):
            for _ in range(5):
                optD.zero_grad()
                fake = G(torch.randn(8, 4)).detach()
                errD = D(fake).mean() - D(real).mean()
                errD.backward()
                optD.step()
                for p in D.parameters():
                    p.data.clamp_(-0.01, 0.01)
            optG.zero_grad()
            errG = -D(G(torch.randn(8, 4))).mean()
            errG.backward()
            optG.step()
    assert steps_of_backwards(probe) == [s for s in range(3) for _ in range(6)]


def test_c5_manual_sgd_without_torch_optim_has_one_step_per_iteration():
    model = MLP()
    x, y = torch.randn(6, 6), torch.randn(6, 3)
    with gp.Probe(model) as probe:
        for i in range(5):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)
                p.grad = None
    assert steps_of_backwards(probe) == [0, 1, 2, 3, 4]


def test_c5_decorated_recursive_function_steps_are_outermost_calls():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    @gp.Probe(model)
    def train_step(x, depth):
        model(x).pow(2).mean().backward()
        if depth > 0:
            train_step(x, depth - 1)
        opt.step()
        opt.zero_grad()

    for i in range(3):
        train_step(torch.randn(4, 6), 2)
    assert steps_of_backwards(train_step.probe) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ---------------------------------------------------------------- C.6 causes


def test_c6_dcgan_print_item_after_optimizer_steps_is_never_a_cause(capsys):
    G, D = gan_pair()
    optG = torch.optim.Adam(G.parameters(), lr=1e-3)
    optD = torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    real = torch.randn(8, 6)
    ones, zeros = torch.ones(8, 1), torch.zeros(8, 1)
    with gp.Probe({"G": G, "D": D}, every=1) as probe:
        for i in range(3):
            optD.zero_grad()
            output = D(real)
            errD_real = bce(output, ones)
            errD_real.backward()
            D_x = output.mean().item()
            fake = G(torch.randn(8, 4))
            output = D(fake.detach())  # FAKE-DETACH
            errD_fake = bce(output, zeros)
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optD.step()
            optG.zero_grad()
            output = D(fake)
            errG = bce(output, ones)
            errG.backward()
            D_G_z2 = output.mean().item()
            optG.step()
            print(f"{errD.item():.4f} {errG.item():.4f} {D_x:.4f} {D_G_z1:.4f} {D_G_z2:.4f}")  # PRINT
    params = probe.to_pandas()["params"]
    none = params[params["status"] == "none"]
    assert not (none["site"] == site_of("PRINT")).any(), none[["backward", "param", "cause", "site"]]
    assert not (none["cause"] == "to_python").any(), none[["backward", "param", "cause", "site"]]
    g_names = {f"G.{n}" for n, _ in G.named_parameters()}
    for i in range(3):
        # errD_real.backward(): G has not run yet in this iteration
        real_rows = by_param(params, backward=3 * i)
        for n in g_names:
            assert real_rows[n].status == "none" and real_rows[n].cause in ("not_used", "not_in_graph"), (
                i, n, real_rows[n].cause, real_rows[n].site)
        # errD_fake.backward(): the detach made earlier in the same iteration
        fake_rows = by_param(params, backward=3 * i + 1)
        for n in g_names:
            assert fake_rows[n].status == "none" and fake_rows[n].cause == "detach", (i, n, fake_rows[n].cause)
            assert fake_rows[n].site == site_of("FAKE-DETACH")
    assert len(capsys.readouterr().out.splitlines()) == 3


class ClampedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        y = x.mm(w.t()).add(b)  # runs under no_grad inside Function.forward
        return y * 2.0

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = gy * 2.0
        return gy.mm(w), gy.t().mm(x), gy.sum(0)


class FnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.relu(ClampedLinear.apply(x, self.fc.weight, self.fc.bias)))


def test_c6_custom_function_forward_is_not_a_cut():
    model = FnNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, every=1) as probe:
        for i in range(2):
            model(torch.randn(5, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    t = probe.to_pandas()
    assert len(t["cuts"]) == 0, t["cuts"][["kind", "site", "module", "upstream"]]
    assert set(t["params"]["status"]) == {"flow"}


def test_c6_lbfgs_closure_internals_are_not_cuts():
    model = MLP()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = torch.randn(6, 6), torch.randn(6, 3)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    with gp.Probe(model, every=1) as probe:
        for i in range(2):
            opt.step(closure)
    cuts = probe.to_pandas()["cuts"]
    assert not cuts["site"].astype(str).str.contains("torch/optim").any(), cuts[["kind", "site"]]
    assert len(cuts) == 0, cuts[["kind", "site", "upstream"]]
    assert not no_gradient(probe)


def test_c6_torch_save_state_dict_is_not_a_cut():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, every=1) as probe:
        for i in range(2):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
    assert buf.tell() > 0
    cuts = probe.to_pandas()["cuts"]
    assert len(cuts) == 0, cuts[["kind", "site", "upstream"]]
    assert not no_gradient(probe)


class DetachNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).detach()  # REAL-DETACH
        return self.fc2(h)


def test_c6_real_detach_in_user_forward_is_the_cause():
    model = DetachNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, every=1) as probe:
        for i in range(2):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    params = probe.to_pandas()["params"]
    for b in (0, 1):
        rows = by_param(params, backward=b)
        for n in ("fc1.weight", "fc1.bias"):
            assert rows[n].status == "none" and rows[n].cause == "detach", (b, n, rows[n].cause)
            assert rows[n].site == site_of("REAL-DETACH")
        assert rows["fc2.weight"].status == "flow"


# ---------------------------------------------------------------- C.7 reentrant checkpoint, frozen input


class CkptNet(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.emb = nn.Embedding(10, 8)
        self.emb.requires_grad_(False)  # frozen embeddings
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 2)

    def forward(self, idx):
        h = self.emb(idx)
        for blk in self.blocks:
            h = checkpoint(blk, h, use_reentrant=self.use_reentrant)  # CKPT
        return self.head(h)


def _ckpt_train(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for i in range(2):
        model(torch.randint(0, 10, (4, 5))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_c7_reentrant_checkpoint_with_frozen_input_is_explained_once():
    model = CkptNet(use_reentrant=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
        with gp.Probe(model, every=1) as probe:
            _ckpt_train(model)
    assert all(p.grad is None for p in model.blocks.parameters())  # the premise: torch gave them nothing
    params = probe.to_pandas()["params"]
    block_names = {f"blocks.{n}" for n, _ in model.blocks.named_parameters()}
    for b in (0, 1):
        rows = by_param(params, backward=b)
        for n in block_names:
            assert rows[n].status == "none", (b, n, rows[n].status)
            assert rows[n].cause == "reentrant_checkpoint", (b, n, rows[n].cause)
            assert rows[n].site == site_of("CKPT"), (b, n, rows[n].site)
        assert rows["head.weight"].status == "flow" and rows["emb.weight"].status == "frozen"
    about = [f for f in probe.findings if set(getattr(f, "params", None) or []) & block_names
             or "checkpoint" in f.message]
    assert len(about) == 1, [(f.kind, f.message) for f in about]
    f = about[0]
    assert f.kind == "no_gradient"
    assert "use_reentrant=False" in f.message and "enable_input_require_grads" in f.message, f.message
    assert f.site == site_of("CKPT")


def test_c7_non_reentrant_checkpoint_with_frozen_input_flows():
    model = CkptNet(use_reentrant=False)
    with gp.Probe(model, every=1) as probe:
        _ckpt_train(model)
    params = probe.to_pandas()["params"]
    for b in (0, 1):
        rows = by_param(params, backward=b)
        for n, _ in model.blocks.named_parameters():
            assert rows[f"blocks.{n}"].status == "flow", (b, n, rows[f"blocks.{n}"].status)
    assert not no_gradient(probe)


# ---------------------------------------------------------------- C.8 create_graph=True


def graph_ops(root):
    """Names of every autograd node reachable from `root`."""
    seen, names, stack = set(), set(), [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def count_packs():
    """A user saved_tensors_hooks that only counts what autograd saves."""
    n = [0]

    def pack(t):
        n[0] += 1
        return t

    return n, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def assert_no_probe_sites(probe):
    for name, df in probe.to_pandas().items():
        for col in df.columns:
            if col == "site" or col.endswith("_site"):
                bad = df[df[col].astype(str).str.contains("gradprobe")]
                assert bad.empty, (name, col, bad[col].tolist())
    for f in probe.findings:
        assert "gradprobe" not in str(f.site), (f.kind, f.site)


def wgan_gp_train(wrap, ops=None, packs=None):
    D = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    with wrap(D):
        for i in range(3):
            real, fake = torch.randn(8, 6), torch.randn(8, 6)
            alpha = torch.rand(8, 1)
            interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            out = D(interp)
            grads = torch.autograd.grad(out.sum(), interp, create_graph=True)[0]  # GP-GRAD
            penalty = ((grads.norm(2, dim=1) - 1) ** 2).mean()
            loss = D(fake).mean() - D(real).mean() + 10 * penalty
            if ops is not None:
                ops |= graph_ops(loss)
            loss.backward()  # GP-BACKWARD
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    return collect(D, opt, losses=losses)


def test_c8_gradient_penalty_probe_arithmetic_never_in_tables():
    probe = check_identical(wgan_gp_train, every=1)
    t = probe.to_pandas()
    bw = t["backward"].sort_values("backward")
    assert bw["site"].tolist() == [site_of("GP-GRAD"), site_of("GP-BACKWARD")] * 3
    assert bw["step"].tolist() == [0, 0, 1, 1, 2, 2]
    assert_no_probe_sites(probe)
    # reference: what autograd saves and which nodes the user's graph holds, without the probe
    torch.manual_seed(0)
    ops, (n, hooks) = set(), count_packs()
    with hooks:
        wgan_gp_train(lambda m: contextlib.nullcontext(), ops=ops)
    saved = t["saved"]
    assert len(saved) == n[0], (len(saved), n[0], saved[["op", "kind", "shape", "site", "backward"]])
    assert set(saved["op"].dropna()) <= ops, set(saved["op"].dropna()) - ops
    assert set(saved["module"].dropna()) <= {"", "0", "1", "2"}


def hvp_train(wrap, ops=None):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = []
    with wrap(model):
        for i in range(2):
            params = list(model.parameters())
            loss = model(torch.randn(5, 6)).pow(2).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)  # HVP-GRAD
            vs = [torch.randn_like(p) for p in params]
            gv = sum((g * v).sum() for g, v in zip(grads, vs))
            if ops is not None:
                ops |= graph_ops(gv)
            hv = torch.autograd.grad(gv, params)  # HVP-HV
            for p, h in zip(params, hv):
                p.grad = h.clone()
            opt.step()
            opt.zero_grad()
            out.append([h.detach() for h in hv])
    return collect(model, opt, hv=out)


def test_c8_hessian_vector_product_probe_arithmetic_never_in_tables():
    probe = check_identical(hvp_train, every=1)
    t = probe.to_pandas()
    bw = t["backward"].sort_values("backward")
    assert bw["site"].tolist() == [site_of("HVP-GRAD"), site_of("HVP-HV")] * 2
    assert bw["step"].tolist() == [0, 0, 1, 1]
    assert_no_probe_sites(probe)
    torch.manual_seed(0)
    ops, (n, hooks) = set(), count_packs()
    with hooks:
        hvp_train(lambda m: contextlib.nullcontext(), ops=ops)
    saved = t["saved"]
    assert len(saved) == n[0], (len(saved), n[0], saved[["op", "kind", "shape", "site", "backward"]])
    assert set(saved["op"].dropna()) <= ops, set(saved["op"].dropna()) - ops
    # the first-order norms the probe measures on grads that require grad must not build graph
    assert not any("Norm" in op for op in saved["op"].dropna()), sorted(set(saved["op"].dropna()))


def test_c4_weights_turned_nonfinite_by_an_optimizer_step_are_an_error():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gp.Probe(model) as probe:
        for i in range(3):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            if i == 1:
                opt.param_groups[0]["lr"] = float("inf")  # the step that breaks the weights
            opt.step()
            opt.zero_grad()
    assert not torch.isfinite(model.fc1.weight).all()  # the premise
    bad = [f for f in probe.findings if f.kind == "nonfinite_weights"]
    assert len(bad) == 1 and bad[0].severity == "error" and bad[0].step == 2  # first backward on them
    assert "fc1.weight" in bad[0].params
