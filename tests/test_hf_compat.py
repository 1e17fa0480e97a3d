"""HF models with gradient checkpointing and peft LoRA under the probe (COMPAT E.1, E.4, with C.7, B and A.5):
the reentrant-checkpoint pitfall explained once at the user's line, training bit-identical, LoRA statuses under
the user's parameter names, and no warning of the probe's own. Tiny random-init GPT-2, no hub downloads."""

import contextlib
import os
import warnings

import pytest
import torch

import gradprobe as gp

transformers = pytest.importorskip("transformers", reason="HF gradient checkpointing needs `transformers`")

# peft calls transformers' deprecated `is_gradient_checkpointing` in get_peft_model (setup, not the probe)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
HERE = os.path.basename(__file__)
transformers.logging.set_verbosity_error()


def _line(text: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line(" not in line)


def _here(site) -> bool:
    return isinstance(site, str) and site.rsplit(":", 1)[0].endswith(f"tests/{HERE}")


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)  # dropout on: the RNG is part of identity
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


# the checkpointed blocks' parameter prefix, and the trainable parameters outside them
ARCHS = {"gpt2": (gpt2, "transformer.h.", {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
         "llama": (llama, "model.layers.", {"model.norm.weight", "lm_head.weight"})}


def checkpointed(reentrant: bool, input_grads: bool, arch: str = "gpt2"):
    """A causal LM with frozen input embeddings (GPT-2's wte is tied to lm_head) and HF gradient checkpointing."""
    model = ARCHS[arch][0]()
    model.get_input_embeddings().weight.requires_grad_(False)
    if arch == "gpt2":
        model.transformer.wpe.weight.requires_grad_(False)
    # `gradient_checkpointing_enable` is the deprecated alias (a FutureWarning) of this in transformers >= 5
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    # transformers >= 5 calls enable_input_require_grads() itself; older ones (and code that turns it off) do not
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    if input_grads:
        model.enable_input_require_grads()
    return model.train()


def lora(ckpt: bool = False, reentrant: bool = False):
    peft = pytest.importorskip("peft", reason="the LoRA cases need `peft` (pip install peft)")
    base = checkpointed(reentrant=reentrant, input_grads=False) if ckpt else gpt2()
    # with the pitfall nothing before ln_f could get a gradient: train a copy of ln_f so that backward() can run
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True,
                          modules_to_save=["ln_f"] if reentrant else None)
    model = peft.get_peft_model(base, cfg)  # freezes every base parameter
    if reentrant:  # peft turns input grads on under checkpointing; the pitfall is what code turning it off gets
        base.disable_input_require_grads()
    return model.train()


SETUPS = {"ckpt_nonreentrant": lambda: checkpointed(reentrant=False, input_grads=False),
          "ckpt_reentrant_input_grads": lambda: checkpointed(reentrant=True, input_grads=True),
          "ckpt_reentrant_frozen_input": lambda: checkpointed(reentrant=True, input_grads=False),
          "llama_ckpt_reentrant_frozen_input": lambda: checkpointed(reentrant=True, input_grads=False, arch="llama"),
          "lora": lora,
          "lora_ckpt": lambda: lora(ckpt=True),
          "lora_ckpt_reentrant_frozen_input": lambda: lora(ckpt=True, reentrant=True)}


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (2, 8), generator=g) for _ in range(n)]


def train(model, probe=None, steps=3):
    """The user's loop: AdamW steps on a causal LM loss; what it produced, step by step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    losses, grads = [], []
    torch.manual_seed(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probe if probe is not None else contextlib.nullcontext():
            for ids in batches(steps):
                loss = model(input_ids=ids, labels=ids).loss  # USER FORWARD
                loss.backward()
                losses.append(loss.detach().clone())
                grads.append({n: None if p.grad is None else p.grad.clone()
                              for n, p in model.named_parameters() if n in names})
                opt.step()
                opt.zero_grad()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state, "rng": torch.get_rng_state(),
            "warnings": [(w.category, str(w.message), w.filename, w.lineno) for w in caught]}


def _hooks(model):
    return [(n, list(m._forward_pre_hooks), list(m._forward_hooks), list(m._backward_hooks),
             list(m._backward_pre_hooks)) for n, m in model.named_modules()]


def probed(model, steps=3):
    before = _hooks(model)  # the user's own hooks (enable_input_require_grads installs one)
    probe = gp.Probe(model, every=1)
    out = train(model, probe, steps)
    assert not probe.depth and _hooks(model) == before  # everything the probe installed is removed
    return probe, out


FORWARD = f"tests/{HERE}:{_line('# USER FORWARD')}"


# ---------------------------------------------------------------- gradient checkpointing (C.7, E.4)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_reentrant_checkpoint_with_frozen_embeddings_is_one_finding_at_the_users_forward(arch):
    model = checkpointed(reentrant=True, input_grads=False, arch=arch)
    _, prefix, outside = ARCHS[arch]
    probe, out = probed(model, steps=2)
    blocks = {n for n, p in model.named_parameters() if n.startswith(prefix)}
    assert blocks and all(g[n] is None for g in out["grads"] for n in blocks)  # the premise: torch gave none
    t = probe.to_pandas()
    params = t["params"]
    assert set(params.backward) == {0, 1}
    for b, rows in params.groupby("backward"):
        rows = rows.set_index("param")
        for n in blocks:
            assert (rows.loc[n, "status"], rows.loc[n, "cause"]) == ("none", "reentrant_checkpoint"), (b, n)
            assert rows.loc[n, "site"] == FORWARD, (b, n, rows.loc[n, "site"])  # never inside transformers
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen and set(rows.loc[list(frozen), "status"]) == {"frozen"}
        assert set(rows.loc[list(outside), "status"]) == {"flow"}
        assert set(rows.index) == blocks | frozen | outside
    about = [f for f in probe.findings if set(f.params) & blocks or "checkpoint" in f.message]
    assert len(about) == 1, [(f.kind, f.message) for f in about]
    (f,) = about
    assert (f.kind, f.severity, f.site) == ("no_gradient", "error", FORWARD)
    assert set(f.params) == blocks
    assert "use_reentrant=False" in f.message and "enable_input_require_grads" in f.message, f.message
    sites = [s for tab in ("params", "cuts", "backward", "findings") for s in t[tab]["site"].dropna()]
    assert sites and all(_here(s) for s in sites), sorted(set(sites))


@pytest.mark.parametrize("fix", ["ckpt_nonreentrant", "ckpt_reentrant_input_grads"])
def test_fixed_checkpointing_every_trainable_param_flows(fix):
    model = SETUPS[fix]()
    probe, out = probed(model, steps=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("transformer.h.") for n in trainable)
    assert all(g[n] is not None and g[n].any() for g in out["grads"] for n in trainable)  # the premise
    t = probe.to_pandas()
    params = t["params"]
    assert set(params.backward) == {0, 1}
    for b, rows in params.groupby("backward"):
        status = rows.set_index("param").status
        assert {n: s for n, s in status.items() if n in trainable and s != "flow"} == {}, b
        assert set(status.drop(list(trainable))) == {"frozen"}
    assert [f for f in probe.findings if f.severity in ("error", "warning")] == []
    assert all(_here(s) for tab in ("params", "cuts", "backward", "findings") for s in t[tab]["site"].dropna())


# ---------------------------------------------------------------- identical training (B), no warnings (A.5)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_is_bit_identical_with_and_without_the_probe(setup):
    without = train(SETUPS[setup]())
    _, with_ = probed(SETUPS[setup]())
    assert len(with_["losses"]) == len(without["losses"]) == 3
    for a, b in zip(with_["losses"], without["losses"]):
        assert torch.equal(a, b)
    for step, (ga, gb) in enumerate(zip(with_["grads"], without["grads"])):
        assert ga.keys() == gb.keys()
        for n in ga:
            assert (ga[n] is None) == (gb[n] is None), (step, n)
            assert ga[n] is None or torch.equal(ga[n], gb[n]), (step, n)
    assert with_["state"].keys() == without["state"].keys()
    for n in with_["state"]:
        assert torch.equal(with_["state"][n], without["state"][n]), n
    assert torch.equal(with_["rng"], without["rng"])


@pytest.mark.parametrize("setup", list(SETUPS))
def test_the_probe_adds_no_warning_inside_the_users_calls(setup):
    without = train(SETUPS[setup]())["warnings"]
    with_ = probed(SETUPS[setup]())[1]["warnings"]
    assert with_ == without


# ---------------------------------------------------------------- peft LoRA (E.1, E.4)


def test_lora_adapters_flow_base_frozen_under_the_users_names():
    model = lora()
    probe, out = probed(model)
    t = probe.to_pandas()
    params = t["params"]
    assert set(params.param) == {n for n, _ in model.named_parameters()}  # PeftModel's names, as the user sees
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert len(adapters) == 4  # lora_A and lora_B of both blocks' c_attn
    assert set(params.backward) == {0, 1, 2}
    for b, rows in params.groupby("backward"):
        status = rows.set_index("param").status
        assert set(status.drop(list(adapters))) == {"frozen"}, b
        for n in adapters:
            # peft starts lora_B at zero, so lora_A's first gradient is exactly zero: that is the fact to report
            want = "zero" if b == 0 and ".lora_A." in n else "flow"
            assert status[n] == want, (b, n, status[n])
            assert (status[n] == "zero") == (not out["grads"][b][n].any()), (b, n)
    assert [f for f in probe.findings if f.severity in ("error", "warning")] == [], probe.findings
    assert all(_here(s) for tab in ("params", "cuts", "backward", "findings") for s in t[tab]["site"].dropna())


def test_lora_over_reentrant_checkpoint_with_frozen_input_is_the_c7_pitfall_at_the_users_forward():
    model = SETUPS["lora_ckpt_reentrant_frozen_input"]()
    probe, out = probed(model, steps=2)
    adapters = {n for n, p in model.named_parameters() if ".lora_" in n}
    saved = {n for n, p in model.named_parameters() if p.requires_grad} - adapters  # the trained copy of ln_f
    assert len(adapters) == 4 and all(g[n] is None for g in out["grads"] for n in adapters)  # the premise
    assert len(saved) == 2 and all(".ln_f.modules_to_save." in n for n in saved)
    params = probe.to_pandas()["params"]
    for b, rows in params.groupby("backward"):
        rows = rows.set_index("param")
        for n in adapters:
            assert (rows.loc[n, "status"], rows.loc[n, "cause"], rows.loc[n, "site"]) == (
                "none", "reentrant_checkpoint", FORWARD), (b, n)
        assert set(rows.loc[list(saved), "status"]) == {"flow"}
        assert set(rows.status.drop(list(adapters | saved))) == {"frozen"}
    about = [f for f in probe.findings if set(f.params) & adapters or "checkpoint" in f.message]
    assert len(about) == 1, [(f.kind, f.message) for f in about]
    (f,) = about
    assert (f.kind, f.severity, f.site, set(f.params)) == ("no_gradient", "error", FORWARD, adapters)
    assert "use_reentrant=False" in f.message and "enable_input_require_grads" in f.message, f.message
