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


def _graph_only_bytes(model, x):
    """Bytes of storages autograd saves for one forward that exist only because of the graph (not
    parameters, buffers or the input), each storage once: counted with our own hooks, no probe."""
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) + [x]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(n for k, n in seen.items() if k not in known), set(seen) & known


@pytest.mark.parametrize("sched", SCHEDULES, ids=["default", "every1", "every3"])
def test_resnet18_no_grad_saving_is_its_activation_bytes_never_parameters(sched):
    """COMPAT C.10 / issue 9: on torchvision resnet18 (batch 8, 64x64, train mode) what `no_grad` would
    save -- the probe's unused_graph bytes and compare_no_grad's saving -- is the activation bytes."""
    models = pytest.importorskip("torchvision.models")
    import gradprobe as gp
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10)
    x = torch.randn(8, 3, 64, 64)
    want, params_saved = _graph_only_bytes(model, x)
    assert params_saved  # resnet18 saves its conv weights and BN buffers: they must stay out
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gp.Probe(model, **sched) as probe:
        for _ in range(4):  # with every=3 the validation after iteration 2 is in step 3, a detail step
            loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model(x)  # VALIDATION: a forward under grad that no backward uses
    (f,) = [f for f in probe.findings if f.kind == "unused_graph"]  # same shapes: bytes do not change
    assert abs(f.nbytes - want) <= 0.05 * want, (f.nbytes, want)
    saved = probe.to_pandas()["saved"]
    val = saved[saved["graph"] == saved["graph"].max()]
    assert set(val.loc[val["kind"].isin(["parameter", "buffer"]), "nbytes"].index).isdisjoint(
        val.loc[val["kind"].isin(["activation", "cast"])].index)
    assert int(val.loc[val["kind"] == "parameter", "storage_bytes"].sum()) > 0  # weights were saved, and kept apart
    cmp = gp.compare_no_grad(model, x).to_pandas().set_index("mode")
    saving = cmp.loc["grad", "activation_bytes"] + cmp.loc["grad", "cast_bytes"]
    assert abs(saving - want) <= 0.05 * want, (saving, want)
