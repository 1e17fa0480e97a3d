"""DDP and FSDP2 (fully_shard) with 2 CPU processes on gloo (COMPAT C.11, C.12, E.3) and gp.ddp_check.

Each test spawns 2 processes running a worker of tests/dist_workers.py on a free port of 127.0.0.1; the
workers write their probe's params table, findings and meta to tmp_path/rank{R}.json."""

from __future__ import annotations

import json
import math
import os
import socket
import sys

import pytest
import torch
from torch import nn

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import dist_workers  # noqa: E402

from gradprobe.ddpcheck import ddp_check  # noqa: E402

WORKERS = os.path.basename(dist_workers.__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_path, scenario: str, **kw) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(dist_workers.main, args=(2, free_port(), scenario, str(tmp_path), kw), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return out


def rows(res, param=None, step=None):
    return [r for r in res["params"] if (param is None or r["param"] == param) and (step is None or r["step"] == step)]


def check_ddp_run(ranks, prefix="") -> None:
    for rank, res in enumerate(ranks):
        if prefix:  # model=None: the model DDP wraps is named after its class
            assert all(r["param"].startswith(prefix) for r in res["params"])
            for r in res["params"] + res["ddp_findings"]:
                if "param" in r:
                    r["param"] = r["param"][len(prefix):]
                else:
                    r["params"] = [n[len(prefix):] for n in r["params"]]
        assert res["meta"]["rank"] == rank and res["meta"]["world_size"] == 2 and res["meta"]["backend"] == "gloo"
        assert res["meta"]["ddp"]["find_unused_parameters"] is True
        assert not [w for w in res["warnings"] if "gradprobe" in w], res["warnings"]  # none raised by the probe
        assert res["identical"]  # weights and gradients bit-identical to the same run without the probe
        names = {r["param"] for r in res["params"]}
        assert "only1.weight" in names and not any(n.startswith("module.") for n in names)
        # used on rank 1 only: DDP's all-reduce gave it a gradient on rank 0 too, so it is not `none` there
        for r in rows(res, "only1.weight") + rows(res, "only1.bias"):
            assert r["status"] == "flow", (rank, r)
        # used by no rank: none, with its cause; the finding names them and the worker's backward line
        for r in rows(res, "never.weight") + rows(res, "never.bias"):
            assert r["status"] == "none" and r["cause"] == "not_used", (rank, r)
        unused = [f for f in res["ddp_findings"] if f["kind"] == "ddp_unused"]
        assert len(unused) == 1 and set(unused[0]["params"]) == {"never.weight", "never.bias"}
        assert unused[0]["site"].startswith(WORKERS + ":") or os.sep + WORKERS + ":" in unused[0]["site"]
        assert "find_unused_parameters=True" in unused[0]["message"]
        # synchronized norms: the recorded norm is the all-reduced .grad's, not this rank's own gradient
        for step, (synced, local) in enumerate(zip(res["synced"], res["local"])):
            for r in rows(res, step=step):
                if r["status"] == "flow":
                    assert math.isclose(r["grad_norm"], synced[r["param"]], rel_tol=1e-5), (rank, r)
            assert not math.isclose(synced["big.weight"], local["big.weight"], rel_tol=1e-3)
            assert not math.isclose(synced["trunk.weight"], local["trunk.weight"], rel_tol=1e-3)


def test_ddp_branch_used_on_one_rank_and_synchronized_norms(tmp_path):
    check_ddp_run(spawn(tmp_path, "ddp_branch"))


def test_ddp_small_buckets_bucket_views_and_probe_on_the_inner_model(tmp_path):
    # one bucket per tensor (big and small ones reduced separately), gradients as bucket views, and the
    # probe given the model DDP wraps (the wrapper is found, its flags read)
    check_ddp_run(spawn(tmp_path, "ddp_branch", bucket_cap_mb=0.001, gradient_as_bucket_view=True,
                        pass_inner=True))


def test_ddp_model_none_finds_the_wrapped_model(tmp_path):
    check_ddp_run(spawn(tmp_path, "ddp_branch", pass_inner="none"), prefix="Branchy.")


@pytest.mark.parametrize("probe_first,accumulate", [(True, False), (False, False), (True, True)],
                         ids=["probe_before_fully_shard", "probe_after", "accumulation_without_sync"])
def test_fsdp2_trained_parameters_flow(tmp_path, probe_first, accumulate):
    # every track, also when the probe is made after fully_shard (DTensor parameters have no storage of
    # their own: their local shards are keyed instead)
    ranks = spawn(tmp_path, "fsdp2", probe_first=probe_first, track=["grads", "cuts", "memory"],
                  accumulate=accumulate)
    for rank, res in enumerate(ranks):
        assert res["meta"]["rank"] == rank and res["meta"]["fsdp"] == "fully_shard"
        assert res["identical"]  # sharded weights bit-identical to the same run without the probe
        names = {r["param"] for r in res["params"]}
        assert names == {"l1.weight", "l1.bias", "l2.weight", "l2.bias", "unused.weight", "unused.bias"}
        assert {r["backward"] for r in res["params"]} == set(range(len(res["shards"])))
        for backward, shards in enumerate(res["shards"]):
            for r in [r for r in res["params"] if r["backward"] == backward]:
                if r["param"].startswith("unused."):
                    assert r["status"] == "none" and r["cause"] == "not_used"
                    continue
                assert r["status"] == "flow", (rank, r)
                if shards[r["param"]] is None:  # this rank holds no part of it, or the gradient was not synced
                    assert r["grad_norm"] is None or math.isnan(r["grad_norm"])
                else:
                    assert math.isclose(r["grad_norm"], shards[r["param"]], rel_tol=1e-5), (rank, r)
        limits = [f["message"] for f in res["findings"] if f["kind"] == "probe_limit"]
        assert any("FSDP2" in m and "shard" in m for m in limits), res["findings"]
        assert any("set_requires_gradient_sync(False)" in m for m in limits) == accumulate


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.spare = nn.Linear(4, 4)  # defined, never called

    def forward(self, x):
        return self.bn(self.used(x))


def test_ddp_check_predicts_the_unused_parameter_error(tmp_path):
    model = Branches()
    model.used.weight.grad = torch.ones(4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 4)
    rng = torch.random.get_rng_state()
    res = ddp_check(model, x)
    assert res.unused == ["spare.weight", "spare.bias"] and not res.ready_twice
    (f,) = res.findings
    assert f.kind == "ddp_unused" and "never ran in forward" in f.message
    assert f.site.startswith(__file__ + ":") or os.path.basename(__file__) in f.site
    assert "Expected to have finished reduction in the prior iteration" in f.message and "spare.weight" in str(res)
    # nothing changed: weights, buffers (BatchNorm statistics), .grad and RNG
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.used.weight.grad, torch.ones(4, 4)) and model.spare.weight.grad is None
    assert model.used.bias.grad is None and torch.equal(torch.random.get_rng_state(), rng)
    # real DDP raises what was predicted (a branch unused on rank 0, find_unused_parameters=False)
    ranks = spawn(tmp_path, "ddp_unused_error")
    assert any(r["raised"] and "Expected to have finished reduction in the prior iteration" in r["raised"]
               for r in ranks), [r["raised"] for r in ranks]
    # and the probe on rank 0 (where the branch did not run) said so before DDP raised
    (f,) = ranks[0]["ddp_findings"]
    assert f["kind"] == "ddp_unused" and set(f["params"]) == {"only1.weight", "only1.bias"}
    assert "On rank 0, with find_unused_parameters=False" in f["message"] and WORKERS in f["site"]
    assert "Expected to have finished reduction in the prior iteration" in f["message"]
    assert ranks[1]["ddp_findings"] == []


class Twice(nn.Module):
    """A layer reused in two reentrant checkpoints, after a `pre` layer (whose gradient is still pending when
    the layer's second gradient arrives) or alone."""

    def __init__(self, pre: bool):
        super().__init__()
        self.pre = nn.Linear(8, 8) if pre else None
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if self.pre is not None:
            x = self.pre(x)
        h = checkpoint(self.layer, x, use_reentrant=True)
        return checkpoint(self.layer, h, use_reentrant=True)


def test_ddp_check_predicts_marked_ready_twice(tmp_path):
    res = ddp_check(Twice(pre=True), torch.randn(4, 8, requires_grad=True))
    assert res.ready_twice == ["layer.weight", "layer.bias"] and not res.unused
    (f,) = res.findings
    assert f.kind == "ddp_ready_twice" and "use_reentrant=False" in f.message
    from gradprobe.tables.schema import FINDING_KIND
    assert f.kind in FINDING_KIND  # documented with the other finding kinds
    assert os.path.basename(__file__) in f.site and "raises RuntimeError" in f.message
    assert "Expected to mark a variable ready only once" in f.message
    raised = [r["raised"] for r in spawn(tmp_path, "ddp_checkpoint_twice", pre=True)]
    assert all(r and "Expected to mark a variable ready only once" in r for r in raised), raised


def test_ddp_check_predicts_silently_unsynchronized_reuse(tmp_path):
    # every gradient arrived before the layer's second one: DDP's reducer has finished and ignores it
    res = ddp_check(Twice(pre=False), torch.randn(4, 8, requires_grad=True))
    (f,) = res.findings
    assert f.kind == "ddp_ready_twice" and "silently diverge" in f.message
    ranks = spawn(tmp_path, "ddp_checkpoint_twice", pre=False)
    assert all(r["raised"] is None and r["same_on_ranks"] is False for r in ranks), ranks


def test_ddp_check_clean_model_is_ok():
    res = ddp_check(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)), torch.randn(2, 3))
    assert res.ok and res.findings == [] and "OK" in str(res)
