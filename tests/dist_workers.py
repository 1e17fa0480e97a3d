"""Worker functions for tests/test_distributed.py: each runs in a spawned process (gloo, CPU, 127.0.0.1),
trains a real model under a Probe and writes what the test checks to `out/rank{R}.json`."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn



class Branchy(nn.Module):
    """`trunk` runs on every rank, `only1` only on rank 1, `never` on no rank. `big` is large enough to fill a
    DDP bucket of its own when buckets are small."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(16, 16)
        self.big = nn.Linear(16, 512)
        self.head = nn.Linear(512, 1)
        self.only1 = nn.Linear(16, 16)
        self.never = nn.Linear(16, 16)

    def forward(self, x, rank):
        h = torch.tanh(self.trunk(x))
        if rank == 1:
            h = h + self.only1(h)
        return self.head(torch.relu(self.big(h)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 8)  # trains nowhere: the honest `none`

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _params(probe) -> list[dict]:
    p = probe.to_pandas()["params"]
    cols = ["step", "backward", "param", "status", "cause", "site", "grad_norm"]
    return json.loads(p[cols].to_json(orient="records"))


def _findings(probe) -> list[dict]:
    f = probe.to_pandas()["findings"]
    return json.loads(f[["kind", "severity", "site", "message", "params"]].to_json(orient="records"))


def _write(out: str, rank: int, result: dict) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def main(rank: int, world: int, port: int, scenario: str, out: str, kw: dict) -> None:
    try:
        _init(rank, world, port)
        result = globals()[scenario](rank, **kw)
    except BaseException:  # the test reads the traceback instead of a hang or a bare exit code
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _write(out, rank, result)


def ddp_branch(rank: int, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False, pass_inner=False):
    import gradprobe as gp
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Branchy()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=bucket_cap_mb,
              gradient_as_bucket_view=gradient_as_bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data on each rank: local and synchronized gradients differ
    synced, local = [], []
    seen: dict = {}  # this rank's own gradient, before DDP's all-reduce (a tensor hook sees it)
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: seen.__setitem__(n, g.norm().item()))
    observed = None if pass_inner == "none" else model if pass_inner else ddp
    with gp.Probe(observed, every=1) as probe, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            seen.clear()
            opt.zero_grad()
            ddp(torch.randn(4, 16), rank).sum().backward()
            local.append(dict(seen))
            synced.append({n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
    from gradprobe.diagnose.distributed import distributed_findings

    # the same training without the probe: weights and gradients bit-identical
    torch.manual_seed(0)
    plain = Branchy()
    plain_ddp = DDP(plain, find_unused_parameters=True, bucket_cap_mb=bucket_cap_mb,
                    gradient_as_bucket_view=gradient_as_bucket_view)
    plain_opt = torch.optim.SGD(plain_ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    for _ in range(2):
        plain_opt.zero_grad()
        plain_ddp(torch.randn(4, 16), rank).sum().backward()
        plain_opt.step()
    identical = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    identical &= all((a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
                     for a, b in zip(model.parameters(), plain.parameters()))
    return {"params": _params(probe), "findings": _findings(probe), "meta": probe.meta, "identical": identical,
            "ddp_findings": [{k: r[k] for k in ("kind", "site", "params", "message")}
                             for r in distributed_findings(probe.to_pandas(), [])],
            "synced": synced, "local": local, "dist": probe.to_pandas().get("dist").to_dict("records"),
            "warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]}


def ddp_unused_error(rank: int):
    """find_unused_parameters=False with a branch unused on rank 0: what the probe says, what DDP raises."""
    import gradprobe as gp
    from gradprobe.diagnose.distributed import distributed_findings
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Branchy()
    del model.never
    ddp = DDP(model)
    raised = None
    with gp.Probe(ddp, every=1) as probe:
        try:
            for _ in range(2):
                ddp(torch.randn(4, 16), rank).sum().backward()
        except RuntimeError as e:
            raised = str(e)
    return {"raised": raised, "params": _params(probe),
            "ddp_findings": [{k: r[k] for k in ("kind", "site", "params", "message")}
                             for r in distributed_findings(probe.to_pandas(), [])]}


def ddp_checkpoint_twice(rank: int, pre: bool = True):
    """A layer reused inside two reentrant checkpoints under DDP (after a `pre` layer, or alone): what DDP does."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.checkpoint import checkpoint

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(8, 8) if pre else None
            self.layer = nn.Linear(8, 8)

        def forward(self, x):
            if self.pre is not None:
                x = self.pre(x)
            h = checkpoint(self.layer, x, use_reentrant=True)
            return checkpoint(self.layer, h, use_reentrant=True)

    torch.manual_seed(0)
    ddp = DDP(Twice())
    torch.manual_seed(100 + rank)
    try:
        ddp(torch.randn(4, 8, requires_grad=True)).sum().backward()
        grads = [p.grad.clone() for p in ddp.parameters()]
        for g in grads:  # after DDP's all-reduce every rank holds the same gradient, unless it was not synced
            dist.all_reduce(g)
        same = all(torch.allclose(g / 2, p.grad) for g, p in zip(grads, ddp.parameters()))
        ddp(torch.randn(4, 8, requires_grad=True)).sum().backward()
    except RuntimeError as e:
        return {"raised": str(e)}
    return {"raised": None, "same_on_ranks": same}


def fsdp2(rank: int, probe_first: bool = True, track=("grads", "cuts", "memory"), accumulate: bool = False,
          with_probe: bool = True):
    """FSDP2 on Stack, the probe made before or after fully_shard; `accumulate`: two micro-batches per step,
    the first without gradient sync (set_requires_gradient_sync(False))."""
    import contextlib

    import gradprobe as gp
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stack()
    probe = gp.Probe(model, every=1, track=track) if probe_first and with_probe else None
    fully_shard(model.l1)
    fully_shard(model.l2)
    fully_shard(model)
    if probe is None and with_probe:
        probe = gp.Probe(model, every=1, track=track)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    shards = []  # per backward: this rank's shard norm of each .grad after it (None: no sync, or no shard)
    with probe if with_probe else contextlib.nullcontext():
        for _ in range(2):
            opt.zero_grad()
            for micro in range(2 if accumulate else 1):
                sync = micro == 1 or not accumulate
                model.set_requires_gradient_sync(sync)
                model(torch.randn(4, 8)).sum().backward()
                shards.append({n: (p.grad.to_local().norm().item() if sync and p.grad.to_local().numel() else None)
                               for n, p in model.named_parameters() if p.grad is not None or not sync})
            opt.step()
    if not with_probe:
        return model
    plain = fsdp2(rank, probe_first, track, accumulate, with_probe=False)  # the same training, no probe
    identical = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), plain.parameters()))
    return {"params": _params(probe), "findings": _findings(probe), "meta": probe.meta, "shards": shards,
            "identical": identical}


if __name__ == "__main__":  # python tests/dist_workers.py SCENARIO OUT (quick manual runs)
    import torch.multiprocessing as mp

    from test_distributed import free_port

    mp.spawn(main, args=(2, free_port(), sys.argv[1], sys.argv[2], {}), nprocs=2)


def train_alone(rank: int) -> None:
    """A spawned process that trains on its own (like Lightning's ddp_spawn workers): a probe in the parent
    sees none of it."""
    model = nn.Linear(4, 1)
    for _ in range(2):
        model(torch.randn(8, 4)).sum().backward()
