"""COMPAT.md C.10 (memory leaks): each leak is a `graph_leak` finding at the line that made it, with what it keeps.

Real loops of 12 steps, run with a torch.optim optimizer and, separately, with manual SGD
(`p -= lr * p.grad` under no_grad, no optimizer: the probe's steps then come from its new-graph rule),
under every schedule. Expected sites are found by searching this file's own source (`site_of`).
"""

from __future__ import annotations

import contextlib

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp
from tests.clean import hooks_top
from tests.conftest import site_of
from tests.models import MLP

STEPS = 12
SCHEDULES = [pytest.param(1, id="every1"), pytest.param(3, id="every3"), pytest.param(None, id="default")]
OPTIM = [pytest.param(True, id="optim"), pytest.param(False, id="manual_sgd")]
B = 4
# one MLP(6, 8, 3) graph of batch 4 keeps, besides parameters: the input x (4x6, addmm saves it for dW1),
# the relu result (4x8), the prediction and the target (4x3 each, saved by mse_loss); float32
GRAPH_BYTES = B * (6 + 8 + 3 + 3) * 4


pytestmark = pytest.mark.usefixtures("isolated")



class Update:
    """One iteration's parameter update: `opt.step()` or manual SGD; then grads set to None (or kept)."""

    def __init__(self, model, optim, clear=True, lr=0.01):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=lr) if optim else None
        self.clear, self.lr = clear, lr

    def __call__(self):
        if self.opt is not None:
            self.opt.step()
            if self.clear:
                self.opt.zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p -= self.lr * p.grad
        if self.clear:
            for p in self.params:
                p.grad = None


class TinyLM(nn.Module):
    """Embedding -> LSTM -> Linear (sequence first). `frozen_rnn`: the LSTM's weights do not train, so a
    backward through an earlier batch's graph (retain_graph=True) meets no weight changed by the update."""

    def __init__(self, frozen_rnn=False):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(20, 8), nn.LSTM(8, 8), nn.Linear(8, 20)
        self.rnn.requires_grad_(not frozen_rnn)

    def forward(self, tokens, hidden):
        out, hidden = self.rnn(self.emb(tokens), hidden)
        return self.out(out).flatten(0, 1), hidden


def batches():
    return [(torch.randn(B, 6), torch.randn(B, 3)) for _ in range(STEPS)]


def token_batches():
    return [(torch.randint(0, 20, (5, 2)), torch.randint(0, 20, (10,))) for _ in range(STEPS)]


# ------------------------------------------------------------------ the leaking loops (one marked line each)
def loop_accumulate(model, update):
    epoch_loss = 0
    for x, y in batches():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        update()
        epoch_loss += loss  # LEAK-ACCUMULATE
    return epoch_loss


def loop_list(model, update):
    losses = []
    for x, y in batches():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        update()
        losses.append(loss)  # LEAK-LIST
    return losses


def loop_dict(model, update):
    hist = {}
    for i, (x, y) in enumerate(batches()):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        update()
        hist[i] = loss  # LEAK-DICT
    return hist


def loop_grad_graph(model, update):  # update does not clear the grads
    for x, y in batches():
        loss = F.mse_loss(model(x), y)
        loss.backward(create_graph=True)  # LEAK-CREATE-GRAPH
        update()


def loop_retain(model, update):
    kept = []
    for x, y in batches():
        loss = F.mse_loss(model(x), y)
        loss.backward(retain_graph=True)  # LEAK-RETAIN
        update()
        kept.append(loss)
    return kept


def loop_rnn_carry(model, update):
    hidden = None
    for tokens, target in token_batches():
        logits, hidden = model(tokens, hidden)  # LEAK-HIDDEN
        loss = F.cross_entropy(logits, target)
        loss.backward(retain_graph=True)
        update()
    return hidden


# (loop, marker of the line that made the leak, bytes it keeps: None = some (> 0), 0 = only autograd nodes)
LEAKS = {
    "epoch_loss_plus_equal": (loop_accumulate, "LEAK-ACCUMULATE", 0),
    "list_append": (loop_list, "LEAK-LIST", 0),
    "dict_of_losses": (loop_dict, "LEAK-DICT", 0),
    "create_graph_grads_not_cleared": (loop_grad_graph, "LEAK-CREATE-GRAPH", None),
    "retain_graph_losses_kept": (loop_retain, "LEAK-RETAIN", GRAPH_BYTES),
    "rnn_hidden_carried": (loop_rnn_carry, "LEAK-HIDDEN", None),
}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("every", SCHEDULES)
@pytest.mark.parametrize("optim", OPTIM)
@pytest.mark.parametrize("case", list(LEAKS))
def test_graph_leak_found_at_the_line_that_made_it(case, optim, every):
    loop, marker, keeps = LEAKS[case]
    model = TinyLM(frozen_rnn=True) if case == "rnn_hidden_carried" else MLP()
    with gp.Probe(model, every=every) as probe:
        held = loop(model, Update(model, optim, clear=case != "create_graph_grads_not_cleared"))
    assert hooks_top() is None
    t = probe.to_pandas()
    assert t["backward"]["step"].tolist() == list(range(STEPS)), "one step per iteration"
    leaks = [f for f in probe.findings if f.kind == "graph_leak"]
    where = site_of(marker)
    assert leaks, f"no graph_leak finding (expected at {where})"
    assert {f.site for f in leaks} == {where}, [(f.site, f.message) for f in leaks]
    f = leaks[0]
    assert f.severity == "warning"
    # what it keeps, at the step ends that name this line: autograd nodes, growing from step to step
    mem = t["memory"]
    ends = mem[(mem["event"] == "step_end") & (mem["leak_site"] == where)].sort_values("t")
    assert len(ends) >= 2, mem[mem["event"] == "step_end"][["step", "leaked_graphs", "leak_site", "leak_cause"]]
    nodes = ends["leaked_nodes"].astype("int64").tolist()
    assert nodes[0] > 0 and nodes[-1] > nodes[0], nodes
    assert not pd.isna(f.nbytes), "bytes kept are known"
    if keeps == 0:  # backward freed the saved tensors: only the graph's nodes stay alive
        assert f.nbytes == 0, f.nbytes
    elif keeps is None:  # saved tensors (activations) stay alive with the graphs
        assert f.nbytes > 0
    else:  # whole graphs of earlier steps, each `keeps` bytes (parameters are not leaked memory)
        assert f.nbytes >= keeps and f.nbytes % keeps == 0 and f.nbytes <= STEPS * keeps, f.nbytes
    del held


# ------------------------------------------------------------------ PyTorch's own error is left as it is
def loop_rnn_no_retain(model, update):
    hidden = None
    for tokens, target in token_batches():
        logits, hidden = model(tokens, hidden)
        loss = F.cross_entropy(logits, target)
        loss.backward()  # RNN-SECOND-BACKWARD
        update()


@pytest.mark.parametrize("every", SCHEDULES)
@pytest.mark.parametrize("optim", OPTIM)
def test_rnn_hidden_without_retain_graph_raises_exactly_as_without_probe(optim, every):
    def attempt(probed):
        torch.manual_seed(0)
        model = TinyLM()
        update = Update(model, optim)
        ctx = gp.Probe(model, every=every) if probed else contextlib.nullcontext()
        with pytest.raises(Exception) as info:
            with ctx:
                loop_rnn_no_retain(model, update)
        ours = [e for e in info.traceback if str(e.path) == __file__]
        return info.value, ours[-1].lineno + 1

    plain, plain_line = attempt(False)
    got, got_line = attempt(True)
    assert "Trying to backward through the graph a second time" in str(plain)  # the premise
    assert type(got) is type(plain) and str(got) == str(plain)
    assert got_line == plain_line == int(site_of("RNN-SECOND-BACKWARD").rsplit(":", 1)[1])
    assert hooks_top() is None


# ------------------------------------------------------------------ no leak, no finding
def loop_plain(model, update):
    total = 0.0
    for x, y in batches():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        update()
        total += loss.item()
    return total


def loop_rnn_detached(model, update):
    hidden = None
    for tokens, target in token_batches():
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)
        logits, hidden = model(tokens, hidden)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        update()


@pytest.mark.parametrize("every", SCHEDULES)
@pytest.mark.parametrize("optim", OPTIM)
@pytest.mark.parametrize("case", ["plain_item", "rnn_detach"])
def test_no_graph_leak_without_a_leak(case, optim, every):
    model = MLP() if case == "plain_item" else TinyLM()
    with gp.Probe(model, every=every) as probe:
        (loop_plain if case == "plain_item" else loop_rnn_detached)(model, Update(model, optim))
    assert probe.to_pandas()["backward"]["step"].tolist() == list(range(STEPS))
    leaks = [f for f in probe.findings if f.kind == "graph_leak"]
    assert not leaks, [(f.site, f.message) for f in leaks]
