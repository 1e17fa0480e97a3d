"""The transformers callback and HF models: Trainer.train with accumulation and eval (COMPAT E.1, E.4),
ModelOutput outputs measured at the root module."""

import math
import os

import pytest
import torch

import gradprobe as gp

transformers = pytest.importorskip("transformers", reason="the HF integration needs `transformers`")
pytest.importorskip("accelerate", reason="transformers' Trainer needs `accelerate` (pip install accelerate)")

from gradprobe.integrations.hf import GradProbeCallback  # noqa: E402

HERE = os.path.basename(__file__)
transformers.logging.set_verbosity_error()


def _here(site) -> bool:
    return isinstance(site, str) and site.rsplit(":", 1)[0].endswith(HERE)


def _line(text: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line(" not in line)


def gpt2(n_embd=32):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(0, 100, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_train_with_accumulation_and_eval_statuses_sites_and_logged_scalars(tmp_path):
    model = gpt2()
    model.transformer.wpe.weight.requires_grad_(False)  # a frozen embedding
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
        eval_strategy="steps", eval_steps=2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True)
    cb = GradProbeCallback(every=1, report=tmp_path / "report.html")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(16), eval_dataset=Tokens(8),
                                   callbacks=[cb])
    trainer.train()  # the line every site of this run names
    assert not cb.probe.depth  # removed at the end of training
    t = cb.probe.to_pandas()
    params = t["params"]
    assert set(params.step) == {0, 1, 2}  # one step per optimizer step, 2 backwards each
    assert len(t["backward"]) == 6
    status = params.groupby("param").status.agg(set)
    assert status["transformer.wpe.weight"] == {"frozen"}
    assert all(s == {"flow"} for name, s in status.items() if name != "transformer.wpe.weight")
    # every place named is this file's trainer.train() line, never transformers/accelerate/torch
    sites = [s for tab in ("cuts", "backward", "findings") for s in t[tab]["site"].dropna()]
    assert sites and set(sites) == {f"tests/{HERE}:{_line('trainer.train()  # the line')}"}
    assert {"detach", "no_grad"} <= set(t["cuts"].kind)  # Trainer's loss.detach(), the eval forward
    assert not t["cuts"].effective.any() and t["findings"].empty
    assert (tmp_path / "report.html").stat().st_size > 1000
    # per-step scalars at the trainer's steps; the total norm is the one HF logs (before clipping)
    hf = {h["step"]: h for h in trainer.state.log_history if "grad_norm" in h}
    ours = dict(cb.metrics)
    assert set(ours) == {1, 2, 3} == set(hf)
    for step, m in ours.items():
        assert m["gradprobe/grad_norm_total"] == pytest.approx(hf[step]["grad_norm"], rel=1e-5)
        assert m["gradprobe/params_without_grad"] == 0 and m["gradprobe/params_nonfinite"] == 0
        assert m["gradprobe/peak_live_saved_bytes"] > 0
    assert [h for h in trainer.state.log_history if "gradprobe/grad_norm_total" in h]


def test_gpt2_model_output_gradient_measured_at_the_root_module():
    model = gpt2(n_embd=64)
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    seen = {}
    with gp.Probe(model, every=1) as probe:
        out = model(x)  # a CausalLMOutputWithCrossAttentions: logits and a cache object
        out.logits.register_hook(lambda g: seen.update(norm=g.double().norm().item()))
        out.logits.float().pow(2).mean().backward()
    modules = probe.to_pandas()["modules"].set_index("module")
    root = modules.loc["", "grad_norm"]
    assert math.isfinite(root)
    assert root == pytest.approx(seen["norm"], rel=1e-5)
    assert math.isfinite(modules.loc["transformer", "grad_norm"])  # BaseModelOutputWithPast


class Wrapped(torch.nn.Module):
    """The user's module around an HF model, cutting it off from the loss in the user's code."""

    def __init__(self):
        super().__init__()
        self.lm = gpt2()
        self.head = torch.nn.Linear(32, 2)

    def forward(self, ids):
        h = self.lm.transformer(ids).last_hidden_state
        return self.head(h.detach().mean(1))  # the cut: the HF model gets no gradient


def test_cut_around_an_hf_model_names_the_users_line_and_frozen_embedding():
    model = Wrapped()
    model.lm.transformer.wte.weight.requires_grad_(False)
    with gp.Probe(model, every=1) as probe:
        model(torch.randint(0, 100, (2, 8))).sum().backward()
    params = probe.to_pandas()["params"].set_index("param")
    assert params.loc["lm.transformer.wte.weight", "status"] == "frozen"
    assert set(params.loc[["head.weight", "head.bias"], "status"]) == {"flow"}
    cut = params.loc["lm.transformer.h.0.attn.c_attn.weight"]
    assert (cut.status, cut.cause) == ("none", "detach")
    assert cut.site == f"tests/{HERE}:{_line('return self.head(h.detach().mean(1))')}"
    (f,) = [f for f in probe.findings if f.kind in ("no_gradient", "detach_cut")][:1]
    assert _here(f.site)


def test_report_to_tensorboard_gets_the_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard", reason="report_to=['tensorboard'] needs `tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        save_strategy="no", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True)
    cb = GradProbeCallback(every=1)
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=Tokens(8), callbacks=[cb])
    trainer.train()
    events = EventAccumulator(str(tmp_path / "runs" / "gradprobe"))
    events.Reload()
    assert "gradprobe/module_grad_norm" in events.Tags()["histograms"]
    got = {e.step: e.value for e in events.Scalars("gradprobe/grad_norm_total")}
    assert got == pytest.approx({step: m["gradprobe/grad_norm_total"] for step, m in cb.metrics})
    assert sorted(got) == [1, 2]
