"""The Lightning callback: Trainer.fit automatic (with accumulation), manual GAN, ddp_spawn (COMPAT E.2, E.4)."""

import csv
import math
import os

import pytest
import torch

import gradprobe as gp

L = pytest.importorskip("lightning", reason="the Lightning integration needs `lightning` (pip install lightning)")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from gradprobe.integrations.lightning import GradProbe  # noqa: E402

HERE = os.path.basename(__file__)


def _here(site) -> bool:
    return isinstance(site, str) and site.rsplit(":", 1)[0].endswith(HERE)


def _line(text: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line(" not in line)


def _trainer(tmp_path, cb, **kw):
    kw.setdefault("logger", False)
    return L.Trainer(accelerator="cpu", devices=1, callbacks=cb, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def _data(n=32, d=8):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 1)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x):
        h = self.a(x).relu()
        return self.b(h.detach())  # the cut: a gets no gradient

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("loss", loss)  # Lightning detaches it inside its own code
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GradNorms(L.Callback):
    """The total gradient norm the optimizer steps with, measured by Lightning's own hook."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step + 1] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def test_fit_automatic_with_accumulation_statuses_sites_report_and_logged_scalars(tmp_path):
    torch.manual_seed(0)
    cb, norms = GradProbe(every=1, report=tmp_path / "report.html"), GradNorms()
    trainer = _trainer(tmp_path, [cb, norms], max_epochs=1, accumulate_grad_batches=2,
                       logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1)
    trainer.fit(Regressor(), _data())
    assert not cb.probe.depth  # closed at fit end
    t = cb.probe.to_pandas()
    params = t["params"]
    assert set(params.step) == {0, 1}  # 4 batches, 2 accumulated per optimizer step
    assert len(t["backward"]) == 4
    last = params[params.backward == params.backward.max()].set_index("param")
    assert set(last.loc[["b.weight", "b.bias"], "status"]) == {"flow"}
    assert set(last.loc[["unused.weight", "unused.bias"], "cause"]) == {"not_used"}
    assert set(last.loc[["a.weight", "a.bias"], "cause"]) == {"detach"}
    assert set(last.loc[["a.weight", "a.bias"], "site"]) == {f"tests/{HERE}:{_line('return self.b(h.detach())')}"}
    # every place named is in this file, never in Lightning or torch (the loss detached by self.log
    # and by Lightning's closure is at the user's lines)
    sites = [s for tab in ("cuts", "backward", "findings") for s in t[tab]["site"].dropna()]
    assert sites and all(_here(s) for s in sites), sites
    logged_at = _line("self.log(\"loss\", loss)")
    assert f"tests/{HERE}:{logged_at}" in set(t["cuts"].site)
    assert (tmp_path / "report.html").stat().st_size > 1000
    # per-step scalars in the trainer's logger, at the trainer's step: the norm Lightning's hook saw
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("gradprobe/grad_norm_total")}
    assert set(logged) == {1, 2}
    for step, r in logged.items():
        assert float(r["gradprobe/grad_norm_total"]) == pytest.approx(norms.norms[step], rel=1e-5)
        assert int(float(r["gradprobe/params_without_grad"])) == 4  # a.* and unused.*
        assert int(float(r["gradprobe/params_nonfinite"])) == 0
        assert int(float(r["gradprobe/peak_live_saved_bytes"])) > 0


class G(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

    def forward(self, z):
        return self.net(z)


class GAN(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.G = G()
        self.D = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, i):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        self.toggle_optimizer(opt_d)
        fake = self.G(z).detach()  # D's step: no gradient to G
        d_loss = bce(self.D(real), torch.ones(len(real), 1)) + bce(self.D(fake), torch.zeros(len(real), 1))
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        g_loss = bce(self.D(self.G(z)), torch.ones(len(real), 1))
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self):
        return torch.optim.Adam(self.G.parameters(), 1e-3), torch.optim.Adam(self.D.parameters(), 1e-3)


def test_fit_manual_gan_with_toggle_optimizer(tmp_path):
    torch.manual_seed(0)
    cb = GradProbe(every=1)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    model = GAN()
    trainer.fit(model, _data())
    t = cb.probe.to_pandas()
    params = t["params"]
    assert params.step.nunique() == 4  # one step per D/G cycle (4 batches)
    assert len(t["backward"]) == 8
    d_bw, g_bw = sorted(params.backward.unique())[-2:]
    d_rows = params[params.backward == d_bw].set_index("param")
    g_rows = params[params.backward == g_bw].set_index("param")
    gp_names = [f"G.{n}" for n, _ in model.G.named_parameters()]
    dp_names = [f"D.{n}" for n, _ in model.D.named_parameters()]
    # D's step: G toggled off by Lightning (frozen); G's step: D frozen, G flows
    assert set(d_rows.loc[dp_names, "status"]) == {"flow"}
    assert set(d_rows.loc[gp_names, "status"]) == {"frozen"}
    assert set(g_rows.loc[gp_names, "status"]) == {"flow"}
    assert set(g_rows.loc[dp_names, "status"]) == {"frozen"}
    sites = [s for tab in ("cuts", "backward", "findings") for s in t[tab]["site"].dropna()]
    assert sites and all(_here(s) for s in sites), sites
    assert f"tests/{HERE}:{_line('self.manual_backward(g_loss)')}" in set(t["backward"].site)
    assert not [f for f in cb.probe.findings if f.severity == "error"]


class Small(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 1)

    def training_step(self, batch, i):
        x, y = batch
        h = self.a(x)
        if self.global_rank == 1:
            h = h.detach()  # rank 1 only: a gets no gradient there
        return torch.nn.functional.mse_loss(self.b(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_ddp_spawn_two_cpu_processes_save_one_run_per_rank(tmp_path):
    torch.manual_seed(0)
    cb = GradProbe(every=1, report=tmp_path / "report.html")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true", callbacks=[cb], logger=False,
                        max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(Small(), _data())  # ~10-20 s on 2 CPU processes (spawn, gloo)
    assert (tmp_path / "report.html").stat().st_size > 1000  # merged on rank 0
    merged = gp.load([str(tmp_path / f"report.rank{r}.gprobe") for r in (0, 1)]).to_pandas()
    assert set(merged["params"]["rank"]) == {0, 1}
    runs = {r: gp.load(str(tmp_path / f"report.rank{r}.gprobe")) for r in (0, 1)}
    for rank, run in runs.items():
        t = run.to_pandas()
        # `a` is used on rank 0: DDP's all-reduce gives it a gradient on every rank
        assert set(t["params"].status) == {"flow"}
        cuts = t["cuts"]
        if rank == 0:
            assert cuts.empty
        else:  # the cut made on rank 1 only, at the user's line (inside Lightning's optimizer-step closure)
            assert set(cuts.kind) == {"detach"}
            assert set(cuts.site) == {f"tests/{HERE}:{_line('h = h.detach()  # rank 1')}"}


class Fails(Regressor):
    def training_step(self, batch, i):
        if i == 2:
            raise RuntimeError("boom at batch 2")
        return super().training_step(batch, i)


def test_fit_that_raises_removes_the_probe_and_still_writes_the_report(tmp_path):
    torch.manual_seed(0)
    cb = GradProbe(every=1, report=tmp_path / "report.html")
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom at batch 2"):
        trainer.fit(Fails(), _data())
    assert not cb.probe.depth
    assert set(cb.probe.to_pandas()["backward"].step) == {0, 1}
    assert (tmp_path / "report.html").stat().st_size > 1000
    with gp.Probe(torch.nn.Linear(2, 2)):  # nothing of the first probe is left installed
        pass
