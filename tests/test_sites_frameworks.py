"""Sites skip installed frameworks (COMPAT E.4); module outputs in dicts and nested tuples are measured;
a closure run by optimizer.step (as Lightning runs training_step) is the user's code."""

import math
import os
import threading

import pytest
import torch

import gradprobe as gp
from gradprobe.capture import sites

HERE = os.path.basename(__file__)


def _line(text: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if text in line and "_line(" not in line)


def test_installed_packages_and_generated_code_are_frameworks_the_users_files_are_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = os.sep.join(["", "opt", "venv", "lib", "python3.11", "site-packages", "lightning", "a.py"])
    debian = os.sep.join(["", "usr", "lib", "python3", "dist-packages", "accelerate", "b.py"])
    project_venv = str(tmp_path / ".venv" / "lib" / "python3.11" / "site-packages" / "peft" / "c.py")
    assert sites._in_framework(inside) and sites._in_framework(debian) and sites._in_framework(project_venv)
    assert sites._in_framework("<string>")  # dataclasses' generated __init__ (Lightning's closure result)
    assert not sites._in_framework(str(tmp_path / "train.py"))
    assert not sites._in_framework(__file__)
    # a project kept inside site-packages and run from there is the user's code
    own = tmp_path / "lib" / "site-packages" / "myproj"
    own.mkdir(parents=True)
    monkeypatch.chdir(own)
    assert not sites._in_framework(str(own / "train_own.py"))
    assert sites._in_framework(threading.__file__)  # the standard library is installed code too


def test_site_is_the_users_line_when_the_op_runs_inside_a_framework():
    transformers = pytest.importorskip("transformers", reason="needs `transformers`")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    x = torch.randint(1, 50, (1, 4))
    with gp.Probe(model, every=1) as probe:
        model.generate(x, max_new_tokens=2, do_sample=False)  # transformers runs the model under no_grad
        model(x).logits.sum().backward()
    cuts = probe.to_pandas()["cuts"]
    assert set(cuts.kind) == {"no_grad"}
    assert set(cuts.site) == {f"tests/{HERE}:{_line('model.generate(x, max_new_tokens=2')}"}


def test_site_falls_back_to_the_innermost_framework_frame_when_no_user_frame_exists():
    # a thread running code made by exec (`<string>`): no frame of a user file on its stack
    ns = {"sites": sites, "out": {}}
    exec("def f():\n    out['site'] = sites.site(1)\n", ns)
    t = threading.Thread(target=ns["f"])
    t.start()
    t.join()
    assert ns["out"]["site"] == "<string>:2"


class DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return {"main": self.a(x), "aux": [(self.b(x),), None, "text"]}


def test_root_grad_norm_through_a_dict_with_nested_lists_and_tuples():
    torch.manual_seed(0)
    model = DictOut()
    x = torch.randn(5, 4)
    seen = {}
    with gp.Probe(model, every=1) as probe:
        out = model(x)
        main, aux = out["main"], out["aux"][0][0]
        main.register_hook(lambda g: seen.update(main=g.double().pow(2).sum().item()))
        aux.register_hook(lambda g: seen.update(aux=g.double().pow(2).sum().item()))
        (main.pow(2).sum() + 3 * aux.sum()).backward()
    modules = probe.to_pandas()["modules"].set_index("module")
    root = modules.loc["", "grad_norm"]
    assert math.isfinite(root)
    assert root == pytest.approx(math.sqrt(seen["main"] + seen["aux"]), rel=1e-6)
    assert modules.loc["b", "grad_norm"] == pytest.approx(math.sqrt(seen["aux"]), rel=1e-6)


def test_a_cut_inside_an_optimizer_step_closure_is_the_users():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 4)

    def closure():
        opt.zero_grad()
        h = model[0](x)
        loss = model[1](h.detach()).pow(2).mean()  # the cut, run by optimizer.step
        loss.backward()
        return loss

    with gp.Probe(model, every=1) as probe:
        for _ in range(2):
            opt.step(closure)
    t = probe.to_pandas()
    where = f"tests/{HERE}:{_line('loss = model[1](h.detach())')}"
    assert set(t["cuts"].site) == {where} and t["cuts"].effective.all()
    first = t["params"].set_index("param")
    assert set(first.loc[["0.weight", "0.bias"], "cause"]) == {"detach"}
    assert set(first.loc[["0.weight", "0.bias"], "site"]) == {where}


class Autocast(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 1)

    @torch.autocast("cpu", dtype=torch.bfloat16)  # torch.amp's frame wraps the user's forward
    def forward(self, x):
        return self.b(self.a(x).detach())  # the cut, inside the decorated forward


def test_a_cut_inside_a_function_decorated_with_autocast_is_the_users():
    model = Autocast()
    with gp.Probe(model, every=1) as probe:
        model(torch.randn(3, 4)).float().sum().backward()
    cuts = probe.to_pandas()["cuts"]
    assert list(cuts.kind) == ["detach"]
    assert list(cuts.site) == [f"tests/{HERE}:{_line('return self.b(self.a(x).detach())')}"]
