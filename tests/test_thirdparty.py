"""Models nobody here wrote, from pip-installable packages: torchvision resnet18 and a tiny HF GPT-2.

Each trains identically with and without the probe (every schedule), and the probe states
the facts a user expects. torchvision imports beside torch 2.14.1 only (see the Makefile).
"""

import pytest
import torch

from tests.identical import check_identical, collect

SCHEDULES = [{}, {"every": 1}, {"every": 3}]


@pytest.mark.parametrize("sched", SCHEDULES, ids=["default", "every1", "every3"])
def test_torchvision_resnet18_trains_identically_and_every_parameter_flows(sched):
    models = pytest.importorskip("torchvision.models")

    def train(wrap):
        model = models.resnet18(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses = []
        with wrap(model):
            for _ in range(3):
                x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return collect(model, opt, losses=losses)

    probe = check_identical(train, **sched)
    t = probe.to_pandas()
    assert t["backward"]["step"].tolist() == [0, 1, 2]
    assert set(t["params"]["status"]) == {"flow"}
    assert not [f for f in probe.findings if f.severity == "error"]
    saved = t["saved"]
    assert len(saved) and set(saved["kind"]) <= {"activation", "parameter", "input", "buffer"}


@pytest.mark.parametrize("sched", SCHEDULES, ids=["default", "every1", "every3"])
def test_hf_gpt2_trains_identically_and_names_parameters(sched):
    transformers = pytest.importorskip("transformers")

    def train(wrap):
        config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
        model = transformers.GPT2LMHeadModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        with wrap(model):
            for _ in range(3):
                ids = torch.randint(0, 100, (2, 16))
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(out.loss.detach())
        return collect(model, opt, losses=losses)

    probe = check_identical(train, **sched)
    t = probe.to_pandas()
    assert t["backward"]["step"].tolist() == [0, 1, 2]
    params = t["params"]
    # the LM head is tied to the token embedding: one parameter, and it trains
    assert "transformer.wte.weight" in set(params["param"])
    assert set(params["status"]) == {"flow"}
    assert not [f for f in probe.findings if f.severity == "error"]
