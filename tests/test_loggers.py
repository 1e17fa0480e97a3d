"""Per-step scalars and module-norm histograms to TensorBoard-like and W&B-like sinks (issue 11 §4)."""

import math
import time

import pytest
import torch

import gradprobe as gp
from gradprobe.integrations.loggers import log_to


class Recorder:
    """A sink with SummaryWriter's two methods: it keeps what it is given."""

    def __init__(self):
        self.scalars, self.histograms = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, {})[step] = value

    def add_histogram(self, tag, values, step):
        self.histograms.setdefault(tag, {})[step] = list(values)


class RunLike:
    """A sink with a W&B run's `log(dict)`."""

    def __init__(self):
        self.logged = []

    def log(self, data):
        self.logged.append(dict(data))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 2)
        self.spare = torch.nn.Linear(2, 2)  # never used: no gradient

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _train(probe, model, steps, sinks=(), each_step=True):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    norms = []
    with probe:
        for _ in range(steps):
            model(torch.randn(16, 6, generator=g)).pow(2).mean().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms.append(math.sqrt(sum(float(x.double().pow(2).sum()) for x in grads)))
            opt.step()
            opt.zero_grad()
            if each_step:
                for s in sinks:
                    log_to(probe, s)
    for s in sinks:
        log_to(probe, s)  # closed: the last step too
    return norms


def test_scalars_and_histograms_to_a_summarywriter_like_sink_match_the_tables():
    torch.manual_seed(0)
    model, rec = Net(), Recorder()
    probe = gp.Probe(model, every=1)
    norms = _train(probe, model, 5, [rec])
    t = probe.to_pandas()
    total = rec.scalars["gradprobe/grad_norm_total"]
    assert sorted(total) == [0, 1, 2, 3, 4]  # every step once, the last after the probe closed
    for step, value in total.items():
        assert value == pytest.approx(norms[step], rel=1e-6)  # the norm the optimizer stepped with
    assert set(rec.scalars["gradprobe/params_without_grad"].values()) == {2}  # spare.weight, spare.bias
    assert set(rec.scalars["gradprobe/params_nonfinite"].values()) == {0}
    peaks = t["memory"].groupby("step")["peak_saved_bytes"].max()
    for step, value in rec.scalars["gradprobe/peak_live_saved_bytes"].items():
        assert value == peaks[step] > 0
    mods = t["modules"]
    for step, values in rec.histograms["gradprobe/module_grad_norm"].items():
        expected = mods[(mods.step == step) & mods.grad_norm.notna()].grad_norm
        assert sorted(values) == pytest.approx(sorted(expected))
        assert len(values) == 3  # the root, a and b (spare never ran)


def test_wandb_like_run_gets_one_dict_per_step_with_the_probes_step():
    torch.manual_seed(0)
    model, run = Net(), RunLike()
    probe = gp.Probe(model, every=2)
    _train(probe, model, 4, [run], each_step=False)
    assert [d["gradprobe/step"] for d in run.logged] == [0, 1, 2, 3]
    detail = [d for d in run.logged if "gradprobe/grad_norm_total" in d]
    assert [d["gradprobe/step"] for d in detail] == [0, 2]  # norms are measured on detail steps only
    assert all(isinstance(d["gradprobe/module_grad_norm"], list) or hasattr(d["gradprobe/module_grad_norm"],
                                                                             "histogram") for d in detail)
    assert all(d["gradprobe/params_without_grad"] == 2 for d in run.logged)  # counted every step


def test_a_real_summarywriter_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="a real SummaryWriter needs `tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    torch.manual_seed(0)
    model = Net()
    writer = SummaryWriter(log_dir=str(tmp_path))
    probe = gp.Probe(model, every=1)
    norms = _train(probe, model, 3, [writer])
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "gradprobe/module_grad_norm" in events.Tags()["histograms"]
    got = {e.step: e.value for e in events.Scalars("gradprobe/grad_norm_total")}
    assert sorted(got) == [0, 1, 2]
    for step, v in got.items():
        assert v == pytest.approx(norms[step], rel=1e-5)


def test_cost_stays_flat_over_a_200_step_loop():
    torch.manual_seed(0)
    model, rec = Net(), Recorder()
    probe = gp.Probe(model, every=1)  # the worst case: every step in full detail
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    spent = []
    with probe:
        for _ in range(200):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            t0 = time.perf_counter()
            log_to(probe, rec)
            spent.append(time.perf_counter() - t0)
    assert len(rec.scalars["gradprobe/grad_norm_total"]) == 199  # the last step completes at close
    # each call reads only the rows added since the previous one: no growth with the run's length
    first, last = sorted(spent[10:60])[25], sorted(spent[-50:])[25]
    assert last < 3 * first + 2e-3, (first, last)
    assert sum(spent) < 5.0


def test_an_unknown_sink_is_one_clear_error():
    from gradprobe.integrations.loggers import write
    with pytest.raises(TypeError, match="SummaryWriter-like"):
        write(object(), 0, {"params_without_grad": 1})
