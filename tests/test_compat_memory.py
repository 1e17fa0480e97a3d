"""COMPAT.md C.10, C.8, A.3/B.2 (memory): saved bytes exact per module and op; parameters and buffers never
counted as what no_grad would save; values of sampled-out steps missing, never 0; no saved row of the probe's
own arithmetic under create_graph=True; checkpoint and save_on_cpu opened inside the probe.

References are measured without the probe, with `saved_tensors_hooks` on an identical forward (each storage
counted once by (data_ptr, device) while held), or computed by hand from shapes and dtypes (float32: 4 bytes).
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe as gp
from tests.clean import hooks_top
from tests.conftest import site_of
from tests.identical import check_identical, collect

F32 = 4
SCHEDULES = [pytest.param(1, id="every1"), pytest.param(3, id="every3"), pytest.param(None, id="default")]


pytestmark = pytest.mark.usefixtures("isolated")



def detail(step, every):
    """The documented schedule: every N-th step; default: the first 10 steps, then 1 in 100 (no trigger
    fires in these steady loops)."""
    return (step < 10 or step % 100 == 0) if every is None else step % every == 0


def skey(t):
    return t.untyped_storage().data_ptr(), t.device


class _Packed:
    __slots__ = ("i", "t", "__weakref__")

    def __init__(self, i, t):
        self.i, self.t = i, t


class SavedCount:
    """Reference without the probe: what autograd saves, per step and (module, op, kind).

    pack records the innermost running module (forward hooks) and the storage; op is the grad_fn that holds
    the tensor, found by walking the graph afterwards and reading its `_saved_*` fields (which unpacks them).
    A storage counts once while saved tensors hold it (again only if saved anew after the graph let go of
    every saved tensor of it); storages are kept alive so that no address is reused.
    """

    def __init__(self, model=None, inputs=()):
        self.stack, self.packs, self.keep, self.node, self.step, self.live = [], [], [], None, 0, {}
        self.model = model
        self.params = {skey(p) for p in model.parameters()} if model is not None else set()
        self.buffers = {skey(b) for b in model.buffers()} if model is not None else set()
        self.inputs = {skey(t) for t in inputs}

    def pack(self, t):
        st, key = t.untyped_storage(), skey(t)
        self.keep.append(st)
        first = not self.live.get(key)
        self.live[key] = self.live.get(key, 0) + 1
        self.packs.append([self.step, self.stack[-1] if self.stack else None, key, st.nbytes() if first else 0, None])
        p = _Packed(len(self.packs) - 1, t.detach())
        weakref.finalize(p, self._release, key)
        return p

    def _release(self, key):
        self.live[key] -= 1

    def unpack(self, p):
        if self.node is not None:
            self.packs[p.i][4] = self.node
        return p.t

    def __enter__(self):
        self.handles = []
        for name, m in (self.model.named_modules() if self.model is not None else ()):
            self.handles.append(m.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self.handles.append(m.register_forward_hook(lambda m, a, o: self.stack.__delitem__(-1)))
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def name_ops(self, root):
        seen, todo = set(), [root.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            self.node = type(fn).__name__
            for a in dir(fn):
                if a.startswith("_saved_"):
                    getattr(fn, a)
            todo.extend(f for f, _ in fn.next_functions)
        self.node = None

    def table(self, step=0):
        out = {}
        for s, mod, key, nbytes, op in self.packs:
            if s == step:
                kind = ("parameter" if key in self.params else "buffer" if key in self.buffers
                        else "input" if key in self.inputs else "activation")
                out[(mod, op, kind)] = out.get((mod, op, kind), 0) + nbytes
        return {k: v for k, v in out.items() if v}

    def step_bytes(self):
        return {s: sum(self.table(s).values()) for s in sorted({p[0] for p in self.packs})}


def probe_table(saved):
    """The probe's saved rows as {(module, op, kind): bytes} (root module '', outside any module None)."""
    out = {}
    for r in saved.itertuples():
        k = (None if pd.isna(r.module) else r.module, None if pd.isna(r.op) else r.op, r.kind)
        out[k] = out.get(k, 0) + int(r.nbytes)
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------- C.10 saved bytes exact per module and op
class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(5, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class AttnHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0].mean(1))


# name: (model, input, target shape, total saved bytes by hand or None)
LAYERS = {
    # x 4x6 (input), tanh result 4x5, W2.t() 3x5 (parameter), prediction and target 4x3
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: torch.randn(4, 6),
               (4, 3), (4 * 6 + 4 * 5 + 3 * 5 + 4 * 3 * 2) * F32),
    # conv: x 2x3x6x6 (input), weight 4x3x3x3; batch norm: conv output 2x4x6x6, weight 4, running mean and var
    # 4 each (buffers), batch mean and invstd 4 each; relu result 2x4x6x6; linear W.t() 144x3; loss 2x3 twice
    "conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 6 * 6, 3)), lambda: torch.randn(2, 3, 6, 6), (2, 3),
                (216 + 108 + 288 + 4 + 8 + 8 + 288 + 432 + 12) * F32),
    "lstm": (LSTMHead, lambda: torch.randn(2, 4, 5), (2, 3), None),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)),
                  lambda: torch.randint(0, 10, (5, 3)), (5, 3), 5 * 3 * 8 + (5 * 12 + 12 * 3 + 5 * 3 * 2) * F32),
    "multihead_attention": (AttnHead, lambda: torch.randn(2, 4, 8), (2, 3), None),
}


@pytest.mark.parametrize("every", SCHEDULES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_c10_saved_bytes_exact_per_module_op_and_kind(layer, every):
    make, make_x, yshape, by_hand = LAYERS[layer]
    model = make()
    data = [(make_x(), torch.randn(*yshape)) for _ in range(4)]
    x, y = data[0]
    ref_model = copy.deepcopy(model)
    with SavedCount(ref_model, (x, y)) as ref:
        loss = F.mse_loss(ref_model(x), y)
    ref.name_ops(loss)
    want = ref.table()
    if by_hand is not None:
        assert sum(want.values()) == by_hand  # the reference itself, checked by hand
    kinds = {k[2] for k in want}
    assert "parameter" in kinds and "input" in kinds and "activation" in kinds
    assert ("buffer" in kinds) == (layer == "conv_bn")  # BatchNorm (train) saves its running stats
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, every=every) as probe:
        for x, y in data:
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    saved = probe.to_pandas()["saved"]
    for step in range(len(data)):
        if detail(step, every):  # same shapes every step: the same bytes
            assert probe_table(saved[saved["step"] == step]) == want, step
    params = saved[saved["kind"] == "parameter"]
    assert params["param"].notna().all()


# ---------------------------------------------------------------- C.10 unused graph: activations only
@pytest.mark.parametrize("every", SCHEDULES)
def test_c10_unused_graph_counts_activations_never_weights_or_buffers(every):
    model = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xv, yv = torch.randn(7, 6), torch.randn(7, 3)
    with gp.Probe(model, every=every) as probe:
        for _ in range(6):
            loss = F.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.eval()
            val = F.mse_loss(model(xv), yv).item()  # VALIDATION
            model.train()
    (f,) = [f for f in probe.findings if f.kind == "unused_graph"]
    assert f.site == site_of("VALIDATION")
    # no_grad would save: the batch-norm input 7x32, the relu result 7x32, the prediction 7x3. Not the input
    # xv nor the target, not BN's weight (32) and running mean/var (32 + 32, buffers), not W2.t() (32x3)
    assert f.nbytes == (7 * 32 + 7 * 32 + 7 * 3) * F32 == 1876
    del val


# ---------------------------------------------------------------- C.10 sampled-out steps: missing, never 0
MEMORY_BYTES = ["live_saved_bytes", "live_activation_bytes", "counterfactual_saved_bytes", "peak_saved_bytes",
                "peak_counterfactual_bytes"]


@pytest.mark.parametrize("every", SCHEDULES)
def test_c10_values_not_measured_are_missing_never_zero(every):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, every=every) as probe:
        for _ in range(12):
            loss = F.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 3))
            opt.zero_grad()
            loss.backward()
            opt.step()
    t = probe.to_pandas()
    bw = t["backward"]
    assert bw["step"].tolist() == list(range(12))
    on = bw["step"].map(lambda s: detail(s, every))
    assert bw["detail"].astype(bool).tolist() == on.tolist()
    # a detail backward: x 4x6 (input), relu result 4x8, W2.t() 8x3, prediction and target 4x3
    assert (bw.loc[on, "saved_bytes"] == (24 + 32 + 24 + 12 + 12) * F32).all()
    off = bw.loc[~on]
    assert off["saved_bytes"].isna().all(), off[["step", "backward", "saved_bytes"]]
    off_bw, off_steps = set(off["backward"]), set(off["step"])
    mods = t["modules"]
    m_off = mods[mods["backward"].isin(off_bw)]
    assert m_off["saved_bytes"].isna().all(), m_off[["step", "backward", "module", "saved_bytes"]]
    mem = t["memory"]
    rows = mem[mem["backward"].isin(off_bw) | (mem["step"].isin(off_steps) & mem["event"].isin(
        ["forward", "backward_begin", "backward_end", "step_end"]))]
    for col in MEMORY_BYTES:
        made_up = rows[rows[col].notna()]
        assert made_up.empty, (col, made_up[["step", "event", "backward", col]])


# ---------------------------------------------------------------- C.8 gradient penalty: the user's bytes only
def wgan_gp(wrap, ref=None):
    D = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    with wrap(D):
        for i in range(4):
            if ref is not None:
                ref.step = i
            real, fake = torch.randn(8, 6), torch.randn(8, 6)
            alpha = torch.rand(8, 1)
            interp = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            grads = torch.autograd.grad(D(interp).sum(), interp, create_graph=True)[0]
            penalty = ((grads.norm(2, dim=1) - 1) ** 2).mean()
            loss = D(fake).mean() - D(real).mean() + 10 * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return collect(D, opt, losses=losses)


@pytest.mark.parametrize("every", SCHEDULES)
def test_c8_gradient_penalty_saved_bytes_are_the_users_only(every):
    probe = check_identical(wgan_gp, every=every)
    saved = probe.to_pandas()["saved"]
    sites = saved["site"].dropna().astype(str)
    assert not sites.str.contains("gradprobe/").any(), sorted(set(sites))
    torch.manual_seed(0)
    with SavedCount() as ref:
        wgan_gp(lambda m: contextlib.nullcontext(), ref)
    want = ref.step_bytes()
    got = saved.groupby("step")["nbytes"].sum().astype(int).to_dict()
    assert set(got) >= {s for s in want if detail(s, every)}
    for s, nbytes in got.items():
        assert nbytes == want[s], (s, nbytes, want[s])


# ---------------------------------------------------------------- A.3 / B.2 checkpoint and save_on_cpu inside
class CkptNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if self.how in ("nonreentrant", "reentrant"):
            h = checkpoint(self.block, h, use_reentrant=self.how == "reentrant")
        else:
            h = self.block(h)
        return self.head(h)


def ckpt_train(how):
    def train(wrap):
        model = CkptNet(how)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        with wrap(model):
            for _ in range(12):
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
    return train


# activations by hand, batch 4: relu(inp) 4x16, the block's tanh results 4x32 and 4x16, the prediction 4x3.
# With checkpoint the block's inner 4x32 is neither saved nor, when recomputed in backward, counted.
ACTIVATIONS = {"plain": (16 + 32 + 16 + 3) * 4 * F32, "nonreentrant": (16 + 16 + 3) * 4 * F32,
               "reentrant": (16 + 16 + 3) * 4 * F32}


@pytest.mark.parametrize("every", SCHEDULES)
@pytest.mark.parametrize("how", ["nonreentrant", "reentrant", "save_on_cpu", "plain"])
def test_a3_checkpoint_and_save_on_cpu_opened_inside_the_probe(how, every):
    probe = check_identical(ckpt_train(how), every=every)  # runs, and trains bit-identically
    assert hooks_top() is None  # nothing of theirs or the probe's left installed
    if how not in ACTIVATIONS:
        return
    saved = probe.to_pandas()["saved"]
    act = saved[saved["kind"] == "activation"].groupby("step")["nbytes"].sum().astype(int).to_dict()
    for step in range(12):
        if detail(step, every):
            assert act.get(step, 0) == ACTIVATIONS[how], (step, act.get(step))
    assert ACTIVATIONS["nonreentrant"] < ACTIVATIONS["plain"]
