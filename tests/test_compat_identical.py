"""COMPAT.md section B: the probe never changes what PyTorch computes.

Every test runs real PyTorch training/evaluation code twice through `check_identical`
(without a probe, then with one) and asserts that outputs, parameters, gradients, optimizer
state, RNG state and warnings are bit-identical. Where a test names a PyTorch behaviour
(fast path taken, hook called, no graph break), it first asserts that behaviour on the plain
run, so that an identical result cannot come from both runs missing it.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.identical import check_identical, collect
from tests.models import MLP


def sched(every):
    """Probe kwargs for a schedule: None = the default schedule (no `every` passed at all)."""
    return {} if every is None else {"every": every}


def plain_run(train):
    """`train` once without a probe, seeded as `check_identical` seeds it."""
    torch.manual_seed(0)
    return train(lambda model=None: contextlib.nullcontext())


# --------------------------------------------------------------------------------------------
# B.1 fast paths of nn.TransformerEncoder and nn.MultiheadAttention in eval
# --------------------------------------------------------------------------------------------

D_MODEL, NHEAD, BATCH, SEQ = 16, 2, 3, 6
LENGTHS = (6, 4, 2)  # padding at the end (left-aligned), as nested tensors require


def _padding_mask():
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        mask[i, n:] = True  # True = padded
    return mask


def _eval_ctx(kind):
    return torch.no_grad() if kind == "no_grad" else torch.inference_mode()


def _make_encoder():
    layer = nn.TransformerEncoderLayer(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=32, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2)


def _make_mha():
    return nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)


def _forward(arch, model, x, mask):
    if arch == "encoder":
        return model(x, src_key_padding_mask=mask)
    out, _ = model(x, x, x, key_padding_mask=mask, need_weights=False)
    return out


def _native_mha(mha, x, mask):
    """What MultiheadAttention's fast path computes: one torch._native_multi_head_attention call."""
    kpm = F._canonical_mask(mask=mask, mask_name="key_padding_mask", other_type=None,
                            other_name="attn_mask", target_type=x.dtype)
    return torch._native_multi_head_attention(
        x, x, x, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.out_proj.weight, mha.out_proj.bias, kpm, False, True, 1)[0]


def _fast_path_train(arch, grad_ctx, train_steps=0, reenter=False):
    """Optionally train a few steps under the probe, then evaluate in eval mode under
    no_grad/inference_mode with a key padding mask (inside the same `with`, or in a second
    `with` of the same probe when `reenter`)."""

    def train(wrap):
        model = _make_encoder() if arch == "encoder" else _make_mha()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x = torch.randn(BATCH, SEQ, D_MODEL)
        mask = _padding_mask()
        losses = []

        def evaluate():
            model.eval()
            with _eval_ctx(grad_ctx):
                return _forward(arch, model, x, mask)

        ctx = wrap(model)
        with ctx:
            for _ in range(train_steps):
                model.train()
                out = _forward(arch, model, x, mask)
                loss = out.masked_fill(mask.unsqueeze(-1), 0.0).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            out = None if reenter else evaluate()
        if reenter:
            with ctx:
                out = evaluate()
        extra = {}
        with torch.no_grad():
            model.train()  # dropout 0 for MHA: the slow path, same math
            if arch == "mha":
                extra["matches_native"] = torch.equal(out, _native_mha(model, x, mask))
                extra["matches_slow"] = torch.equal(out, _forward(arch, model, x, mask))
            model.eval()
        return collect(model, opt, out=out, losses=losses, **extra)

    return train


def _assert_fast_path_ran(arch, result):
    out, mask = result["out"], _padding_mask()
    if arch == "encoder":
        # nested tensors: padded rows come back exactly 0 (the slow path computes them)
        assert torch.all(out[mask] == 0), "the encoder's fast path did not run without the probe"
        assert torch.all(out[~mask].abs().sum(-1) > 0)
    else:
        assert result["matches_native"], "MultiheadAttention's fast path did not run without the probe"
        assert not result["matches_slow"], "fast and slow paths agree here: the check proves nothing"


FAST_ARCHS = ["encoder", "mha"]
GRAD_CTXS = ["no_grad", "inference_mode"]


@pytest.mark.parametrize("grad_ctx", GRAD_CTXS)
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_path_eval_identical_probe_on_model(arch, grad_ctx):
    train = _fast_path_train(arch, grad_ctx)
    _assert_fast_path_ran(arch, plain_run(train))
    check_identical(train)


@pytest.mark.parametrize("grad_ctx", GRAD_CTXS)
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_path_eval_identical_probe_on_none(arch, grad_ctx):
    train = _fast_path_train(arch, grad_ctx)
    _assert_fast_path_ran(arch, plain_run(train))
    check_identical(train, model=None)


@pytest.mark.parametrize("grad_ctx", GRAD_CTXS)
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_path_eval_identical_after_12_training_steps_default_schedule(arch, grad_ctx):
    # 12 steps: past the default schedule's 10 full-detail steps, into its sampled regime
    train = _fast_path_train(arch, grad_ctx, train_steps=12)
    _assert_fast_path_ran(arch, plain_run(train))
    check_identical(train)


@pytest.mark.parametrize("grad_ctx", GRAD_CTXS)
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_path_eval_identical_after_training_in_earlier_with_of_same_probe(arch, grad_ctx):
    train = _fast_path_train(arch, grad_ctx, train_steps=3, reenter=True)
    _assert_fast_path_ran(arch, plain_run(train))
    check_identical(train)


@pytest.mark.parametrize("grad_ctx", GRAD_CTXS)
@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_path_eval_identical_after_one_training_step_in_same_with(arch, grad_ctx):
    train = _fast_path_train(arch, grad_ctx, train_steps=1)
    _assert_fast_path_ran(arch, plain_run(train))
    check_identical(train, every=1)


@pytest.mark.parametrize("grad_ctx", GRAD_CTXS)
def test_mha_nested_tensor_input_fast_path_only_identical(grad_ctx):
    """A nested-tensor query is accepted only by MultiheadAttention's fast path."""

    def train(wrap):
        mha = _make_mha().eval()
        x = torch.randn(BATCH, SEQ, D_MODEL)
        with _eval_ctx(grad_ctx):
            nt = torch.nested.nested_tensor([x[i, :n] for i, n in enumerate(LENGTHS)])
        with wrap(mha):
            with _eval_ctx(grad_ctx):
                out, _ = mha(nt, nt, nt, need_weights=False)
                padded = out.to_padded_tensor(0.0)
        return collect(mha, out=padded)

    assert plain_run(train)["out"].shape == (BATCH, SEQ, D_MODEL)
    check_identical(train)


# --------------------------------------------------------------------------------------------
# B.2 the user's saved_tensors_hooks / save_on_cpu installed before the probe
# --------------------------------------------------------------------------------------------

SCHEDULES = [pytest.param(1, id="every1"), pytest.param(3, id="every3"), pytest.param(None, id="default")]
N_STEPS = 12  # > 10: the default schedule's sampled regime is reached


def _train_under_outer_hooks(make_hooks):
    def train(wrap):
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        calls = {"pack": 0, "unpack": 0}
        hooks = make_hooks(calls)
        losses = []
        top_inside = top_after = None
        with hooks:
            user_top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            with wrap(model):
                for _ in range(N_STEPS):
                    x, y = torch.randn(8, 6), torch.randn(8, 3)
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.detach())
            top_after = torch._C._autograd._top_saved_tensors_default_hooks(False)
            hooks_back = top_after == user_top
        return collect(model, opt, losses=losses, calls=calls, hooks_back=hooks_back)

    return train


def _counting_saved_tensors_hooks(calls):
    def pack(t):
        calls["pack"] += 1
        return t

    def unpack(t):
        calls["unpack"] += 1
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _counting_save_on_cpu(calls):
    hooks = torch.autograd.graph.save_on_cpu(pin_memory=False)
    pack, unpack = hooks.pack_hook, hooks.unpack_hook  # save_on_cpu's own hooks, counted

    def counted_pack(t):
        calls["pack"] += 1
        return pack(t)

    def counted_unpack(packed):
        calls["unpack"] += 1
        return unpack(packed)

    hooks.pack_hook, hooks.unpack_hook = counted_pack, counted_unpack
    return hooks


@pytest.mark.parametrize("every", SCHEDULES)
def test_user_saved_tensors_hooks_before_probe_run_as_often(every):
    train = _train_under_outer_hooks(_counting_saved_tensors_hooks)
    ref = plain_run(train)
    assert ref["calls"]["pack"] > 0 and ref["calls"]["unpack"] > 0 and ref["hooks_back"]
    check_identical(train, **sched(every))  # calls counts and hooks_back are compared too


@pytest.mark.parametrize("every", SCHEDULES)
def test_user_save_on_cpu_before_probe_runs_as_often(every):
    train = _train_under_outer_hooks(_counting_save_on_cpu)
    ref = plain_run(train)
    assert ref["calls"]["pack"] > 0 and ref["calls"]["unpack"] > 0 and ref["hooks_back"]
    check_identical(train, **sched(every))


# --------------------------------------------------------------------------------------------
# B.3 user tensor hooks, module full-backward hooks, post-accumulate-grad hooks
# --------------------------------------------------------------------------------------------

class BigSmall(nn.Module):
    """fc1.weight has 76,800 elements (> 65,536), fc2.weight 768."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(300, 256)
        self.fc2 = nn.Linear(256, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


HOOK_SCHEDULES = [pytest.param(1, id="every1"), pytest.param(None, id="default")]
WHERE = ["before_with", "inside_with"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("every", HOOK_SCHEDULES)
def test_user_tensor_hooks_see_and_do_the_same(every, where):
    def train(wrap):
        model = BigSmall()
        assert model.fc1.weight.numel() > 65536 and model.fc2.weight.numel() < 65536
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        seen = {"fc1.weight": [], "fc2.weight": []}
        grads = []

        def scaling_hook(name, scale):
            def hook(g):
                seen[name].append(g.detach().clone())
                return g * scale

            return hook

        def register():
            return [model.fc1.weight.register_hook(scaling_hook("fc1.weight", 0.5)),
                    model.fc2.weight.register_hook(scaling_hook("fc2.weight", 3.0))]

        handles = register() if where == "before_with" else []
        with wrap(model):
            if where == "inside_with":
                handles = register()
            for _ in range(N_STEPS):
                loss = model(torch.randn(4, 300)).pow(2).mean()
                loss.backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
                opt.step()
                opt.zero_grad()
        for h in handles:
            h.remove()
        return collect(model, opt, seen=seen, grads_after_backward=grads)

    ref = plain_run(train)
    assert len(ref["seen"]["fc1.weight"]) == len(ref["seen"]["fc2.weight"]) == N_STEPS
    for i, g in enumerate(ref["grads_after_backward"]):  # the hooks' scaling is what .grad holds
        assert torch.equal(g["fc1.weight"], ref["seen"]["fc1.weight"][i] * 0.5)
        assert torch.equal(g["fc2.weight"], ref["seen"]["fc2.weight"][i] * 3.0)
    check_identical(train, **sched(every))


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("every", HOOK_SCHEDULES)
def test_module_full_backward_hooks_see_and_do_the_same(every, where):
    def train(wrap):
        model = BigSmall()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        seen = []

        def clones(gs):
            return [None if g is None else g.detach().clone() for g in gs]

        def record(name):
            def hook(module, grad_input, grad_output):
                seen.append((name, clones(grad_input), clones(grad_output)))

            return hook

        def scale_grad_input(module, grad_input, grad_output):
            seen.append(("fc2-scale", clones(grad_input), clones(grad_output)))
            return tuple(None if g is None else g * 0.25 for g in grad_input)

        def pre_hook(module, grad_output):
            seen.append(("fc1-pre", clones(grad_output)))
            return (grad_output[0] * 2.0,)

        def register():
            return [model.fc1.register_full_backward_hook(record("fc1")),
                    model.fc1.register_full_backward_pre_hook(pre_hook),
                    model.fc2.register_full_backward_hook(scale_grad_input),
                    model.register_full_backward_hook(record("root"))]

        handles = register() if where == "before_with" else []
        with wrap(model):
            if where == "inside_with":
                handles = register()
            for _ in range(N_STEPS):
                x = torch.randn(4, 300, requires_grad=True)
                loss = model(x).pow(2).mean()
                loss.backward()
                seen.append(("x.grad", [x.grad.clone()]))
                opt.step()
                opt.zero_grad()
        for h in handles:
            h.remove()
        return collect(model, opt, seen=seen)

    ref = plain_run(train)
    names = [s[0] for s in ref["seen"]]
    assert names.count("fc1") == names.count("fc1-pre") == names.count("fc2-scale") == N_STEPS
    assert names.count("root") == N_STEPS
    check_identical(train, **sched(every))


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("every", HOOK_SCHEDULES)
def test_post_accumulate_grad_hooks_optimizer_in_backward_the_same(every, where):
    """The PyTorch tutorial's optimizer-in-backward: one optimizer per parameter, stepped and
    zeroed (grad set to None) in the parameter's post-accumulate-grad hook."""

    def train(wrap):
        model = BigSmall()
        opts = {p: torch.optim.SGD([p], lr=0.05, momentum=0.9) for p in model.parameters()}
        names = {p: n for n, p in model.named_parameters()}
        seen = {n: [] for n in names.values()}
        grads_after_backward = []

        def hook(p):
            seen[names[p]].append(p.grad.detach().clone())
            opts[p].step()
            opts[p].zero_grad(set_to_none=True)

        def register():
            return [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]

        handles = register() if where == "before_with" else []
        losses = []
        with wrap(model):
            if where == "inside_with":
                handles = register()
            for _ in range(N_STEPS):
                loss = model(torch.randn(4, 300)).pow(2).mean()
                loss.backward()
                grads_after_backward.append([p.grad is None for p in model.parameters()])
                losses.append(loss.detach())
        for h in handles:
            h.remove()
        return collect(model, list(opts.values()), seen=seen, losses=losses,
                       grads_after_backward=grads_after_backward)

    ref = plain_run(train)
    assert all(len(v) == N_STEPS for v in ref["seen"].values())
    assert all(all(step) for step in ref["grads_after_backward"])  # the hooks set .grad to None
    assert ref["seen"]["fc1.weight"][0].numel() > 65536
    check_identical(train, **sched(every))


# --------------------------------------------------------------------------------------------
# B.4 optimizers, clipping, accumulation, zero_grad(set_to_none=False)
# --------------------------------------------------------------------------------------------

OPT_STEPS = 12


def _standard_loop(make_opt, *, clip=None, micro=1, set_to_none=True):
    def train(wrap):
        model = MLP()
        opt = make_opt(model.parameters())
        losses, norms = [], []
        with wrap(model):
            for _ in range(OPT_STEPS):
                for _ in range(micro):
                    x, y = torch.randn(8, 6), torch.randn(8, 3)
                    loss = F.mse_loss(model(x), y) / micro
                    loss.backward()
                    losses.append(loss.detach())
                if clip is not None:
                    norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)
        return collect(model, opt, losses=losses, norms=norms)

    return train


def _lbfgs_loop(wrap):
    model = MLP()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with wrap(model):
        for _ in range(OPT_STEPS):
            losses.append(opt.step(closure).detach())
    return collect(model, opt, losses=losses)


OPT_CASES = {
    "sgd_momentum": _standard_loop(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "sgd_nesterov": _standard_loop(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                               weight_decay=1e-3)),
    "adam": _standard_loop(lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "adamw_foreach_amsgrad": _standard_loop(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True, fused=False, amsgrad=True)),
    "rmsprop": _standard_loop(lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True)),
    "lbfgs_closure": _lbfgs_loop,
    "clip_grad_norm": _standard_loop(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), clip=0.05),
    "accumulate_4_micro_batches": _standard_loop(lambda ps: torch.optim.Adam(ps, lr=1e-2), micro=4),
    "zero_grad_set_to_none_false": _standard_loop(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                                  set_to_none=False),
}


@pytest.mark.parametrize("every", HOOK_SCHEDULES)
@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimizer_training_identical(case, every):
    train = OPT_CASES[case]
    ref = plain_run(train)
    assert ref["optim"][0]["state"], "the optimizer never stepped"
    if case == "clip_grad_norm":
        assert any(n > 0.05 for n in ref["norms"]), "clipping never clipped"
    if case == "zero_grad_set_to_none_false":
        assert all(g is not None and torch.all(g == 0) for g in ref["grads"].values())
    check_identical(train, **sched(every))


# --------------------------------------------------------------------------------------------
# B.5 torch.compile: no graph break, no recompilation, identical results
# --------------------------------------------------------------------------------------------

def _compiled_train(backend, *, fullgraph=False, compile_inside=False, steps=3):
    def train(wrap):
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        compiled = None if compile_inside else torch.compile(model, backend=backend, fullgraph=fullgraph)
        losses = []
        with wrap(model):
            if compile_inside:
                compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
            for _ in range(steps):
                x, y = torch.randn(8, 6), torch.randn(8, 3)
                loss = F.mse_loss(compiled(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
        result = collect(model, opt, losses=losses,
                         graph_breaks=sum(counters["graph_break"].values()),
                         unique_graphs=counters["stats"]["unique_graphs"],
                         frames=dict(counters["frames"]))
        torch._dynamo.reset()
        return result

    return train


@pytest.mark.parametrize("variant", ["compile_before_with", "compile_inside_with", "fullgraph"])
def test_compile_aot_eager_no_graph_break_no_recompile(variant):
    train = _compiled_train("aot_eager", fullgraph=variant == "fullgraph",
                            compile_inside=variant == "compile_inside_with")
    ref = plain_run(train)
    assert ref["graph_breaks"] == 0 and ref["unique_graphs"] == 1
    check_identical(train)  # graph_breaks, unique_graphs and frames compared with the probe


def test_compile_inductor_no_graph_break_no_recompile():
    train = _compiled_train("inductor", steps=2)
    ref = plain_run(train)
    assert ref["graph_breaks"] == 0 and ref["unique_graphs"] == 1
    check_identical(train)
