"""Scale: what the memory collector keeps and does per step does not grow with the run's length.

Growth is asserted by counting rows and operations, never by timing (run times are in
benchmarks/scale.py and benchmarks/RESULTS.md).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradprobe as gp
from gradprobe.capture.schedule import PERIOD, WARMUP


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _leaking_run(steps):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    with gp.Probe(model, every=1) as probe:
        for _ in range(steps):
            loss = F.mse_loss(model(torch.randn(3, 4)), torch.randn(3, 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss)  # every step's graph stays alive
    return probe, losses


def test_leak_check_work_per_step_does_not_grow_with_the_run():
    (short, _), (long, kept) = _leaking_run(30), _leaking_run(120)
    per_step = [p.memory.log.visits / n for p, n in ((short, 30), (long, 120))]
    assert per_step[1] <= per_step[0] + 0.5, per_step  # O(graphs of the last steps), not O(graphs alive)
    assert per_step[1] <= 6
    assert len(long.memory.log.alive) >= 110  # the leak is real: the graphs are alive
    (f,) = [f for f in long.findings if f.kind == "graph_leak"]
    assert "losses" in f.message


def test_default_schedule_keeps_saved_rows_of_detail_steps_only_and_few_memory_rows():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = 2 * PERIOD + 30
    with gp.Probe(model) as probe:
        for _ in range(steps):
            loss = F.mse_loss(model(torch.randn(3, 4)), torch.randn(3, 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
    t = probe.to_pandas()
    detail = t["steps"].loc[t["steps"]["detail"], "step"].tolist()
    assert detail == list(range(WARMUP)) + [PERIOD, 2 * PERIOD]
    per_step = t["saved"].groupby("step").size()
    assert per_step.index.tolist() == detail
    assert per_step.nunique() == 1  # the same forward every step: the same rows
    mem = t["memory"]
    assert len(mem) <= 6 * len(detail) + 4, mem["event"].value_counts().to_dict()
    assert set(mem["step"]) <= set(detail) | {steps - 1}
    bw = t["backward"]
    assert bw.loc[~bw["detail"], "saved_bytes"].isna().all()  # not measured: NA, never 0
    assert (bw.loc[bw["detail"], "saved_bytes"] > 0).all()


@pytest.mark.parametrize("T", [50, 200])
def test_tensor_saved_T_times_is_one_storage_released_at_once(T):
    """An unrolled RNNCell saves its weights at every step: one storage record each, whose live set
    (a dict) empties as the backward releases them."""
    torch.manual_seed(0)
    cell = nn.RNNCell(4, 4)
    with gp.Probe(cell, every=1) as probe:
        h = torch.zeros(1, 4)
        for _ in range(T):
            h = cell(torch.randn(1, 4), h)
        lg = probe.memory.log
        weight_rows = sum(1 for i in range(len(lg)) if lg.s_param[lg.storage[i]] == "weight_hh")
        h.sum().backward()
    assert weight_rows == T - 1  # the first step: h needs no gradient, so W_hh is not saved
    saved = probe.to_pandas()["saved"]
    w = saved[saved["param"] == "weight_hh"]
    assert w["storage"].nunique() == 1 and (w["freed_by"] == "backward").all()
    assert not lg.s_live and not lg.by_key  # nothing left live
