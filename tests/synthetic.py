"""Synthetic run tables, built with schema.frame, for testing the report and run file
without torch: a small GAN-like run (`small_run`) and a big one (`big_run`) for timing.

The small run has every parameter status, cut kinds that were and were not effective,
saved tensors of every kind, a retained graph, and findings of several kinds and severities.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from gradprobe.tables.schema import TABLES, frame

# param -> (module, numel)
PARAMS = {
    "G.fc1.weight": ("G.fc1", 64 * 16), "G.fc1.bias": ("G.fc1", 64),
    "G.fc2.weight": ("G.fc2", 8 * 64), "G.fc2.bias": ("G.fc2", 8),
    "D.emb.weight": ("D.emb", 100 * 8),          # frozen
    "D.fc1.weight": ("D.fc1", 32 * 8), "D.fc1.bias": ("D.fc1", 32),
    "D.aux.weight": ("D.aux", 32 * 4),           # cut by .detach(): none
    "D.norm.weight": ("D.norm", 32),             # zero gradient
    "D.out.weight": ("D.out", 32), "D.out.bias": ("D.out", 1),  # NaN at the last step
}
MODULES = {  # module -> parent
    "G": None, "G.fc1": "G", "G.fc2": "G",
    "D": None, "D.emb": "D", "D.fc1": "D", "D.aux": "D", "D.norm": "D", "D.out": "D",
}
N_STEPS = 4
DETACH_SITE = "train_gan.py:42"
ITEM_SITE = "train_gan.py:57"

FINDINGS = [
    dict(kind="no_gradient", severity="error",
         message="D.aux.weight got no gradient in any backward: cut by .detach() at train_gan.py:42",
         site=DETACH_SITE, nbytes=None, step=0, params=["D.aux.weight"]),
    dict(kind="nonfinite_grad", severity="error",
         message="D.out.weight and D.out.bias got NaN gradients in step 3",
         site="train_gan.py:61", nbytes=None, step=3, params=["D.out.weight", "D.out.bias"]),
    dict(kind="graph_leak", severity="warning",
         message="running_loss += loss keeps every step's graph alive (use loss.item())",
         site="train_gan.py:70", nbytes=3_145_728, step=1, params=[]),
    dict(kind="retain_graph_unneeded", severity="warning",
         message="retain_graph=True at train_gan.py:55 but no later backward used the graph",
         site="train_gan.py:55", nbytes=524_288, step=2, params=[]),
    dict(kind="unused_graph", severity="info",
         message="evaluation forward at eval.py:12 built a graph no backward used: "
                 "torch.no_grad() would have saved 2.0 MiB",
         site="eval.py:12", nbytes=2_097_152, step=2, params=[]),
    dict(kind="inplace_saved", severity="warning",
         message="x.data.mul_(2) at train_gan.py:48 changed a tensor saved for backward",
         site="train_gan.py:48", nbytes=None, step=None, params=["D.fc1.weight"]),
]


def _status(param: str, step: int, side: str) -> tuple[str, str | None, str | None, float]:
    """(status, cause, site, grad_norm) of one parameter in one backward."""
    owner = param.split(".")[0]
    if param == "D.emb.weight":
        return "frozen", None, None, np.nan
    if owner != side:
        return "none", "not_in_graph", None, np.nan
    if param == "D.aux.weight":
        return "none", "detach", DETACH_SITE, np.nan
    if param == "D.norm.weight":
        return "zero", None, None, 0.0
    if param.startswith("D.out") and step == N_STEPS - 1:
        return "nonfinite", None, None, np.nan
    rng = np.random.default_rng(zlib.crc32(f"{param}/{step}".encode()))
    depth = list(PARAMS).index(param)
    return "flow", None, None, float(10.0 ** (-depth / 3) * rng.uniform(0.5, 2.0))


def small_run() -> tuple[dict[str, pd.DataFrame], dict]:
    """A 4-step GAN-like run: each step a D backward then a G backward."""
    params, modules, backward, memory, saved, cuts = [], [], [], [], [], []
    b = 0
    t = 0.0
    for step in range(N_STEPS):
        for side in ("D", "G"):
            counts = dict.fromkeys(["flow", "zero", "nonfinite", "none", "frozen"], 0)
            mod_status: dict[str, list[str]] = {}
            for arrival, (p, (mod, numel)) in enumerate(PARAMS.items()):
                status, cause, site, norm = _status(p, step, side)
                counts[status] += 1
                mod_status.setdefault(mod, []).append(status)
                params.append(dict(
                    step=step, backward=b, param=p, module=mod, status=status, cause=cause,
                    site=site, grad_norm=norm, grad_maxabs=norm / 3 if status == "flow" else np.nan,
                    arrival=float(arrival) if status in ("flow", "zero", "nonfinite") else np.nan,
                    numel=numel, kind="parameter"))
            for order, (mod, parent) in enumerate(MODULES.items()):
                sts = [s for m2, ss in mod_status.items() if m2 == mod or m2.startswith(mod + ".") for s in ss]
                status = next((s for s in ("nonfinite", "flow", "zero", "none", "frozen") if s in sts), "none")
                n_params = sum(n for p, (m2, n) in PARAMS.items() if m2 == mod or m2.startswith(mod + "."))
                modules.append(dict(
                    step=step, backward=b, module=mod, status=status,
                    grad_norm=np.nan if status != "flow" else 0.1 * (order + 1),
                    saved_bytes=4096 * (order + 1) if mod.startswith(side) else None,
                    parent=parent, depth=mod.count("."), order=order,
                    n_params=n_params, **{f"params_{s}": sts.count(s) for s in
                                          ("flow", "zero", "nonfinite", "none", "frozen")}))
            retain = side == "D" and step == 2
            backward.append(dict(
                step=step, backward=b, site=f"train_gan.py:{55 if side == 'D' else 66}",
                retain_graph=retain, saved_bytes=1_048_576 if side == "D" else 786_432,
                retained_bytes=524_288 if retain else 0, create_graph=False, api="tensor.backward",
                t=t + 0.01, duration=0.004, error=None,
                **{f"params_{s}": c for s, c in counts.items()}))
            b += 1
            for event, live in (("forward", 1_048_576), ("backward", 262_144)):
                t += 0.01
                memory.append(dict(t=t, step=step, event=event, live_saved_bytes=live + step * 1_048_576,
                                   rss_bytes=200_000_000 + step * 1_000_000, cuda_allocated_bytes=None))
        for mod, op, nbytes, kind in (
            ("G.fc1", "addmm", 65_536, "activation"), ("G.fc1", "addmm", 4096, "parameter"),
            ("G.fc2", "relu", 32_768, "activation"), ("D.fc1", "addmm", 16_384, "input"),
            ("D.fc1", "addmm", 1024, "parameter"), ("D.out", "sigmoid", 8192, "activation"),
        ):
            freed = "alive" if step == N_STEPS - 1 else ("graph_dropped" if op == "sigmoid" else "backward")
            saved.append(dict(step=step, module=mod, op=op, nbytes=nbytes, kind=kind, freed_by=freed))
        cuts.append(dict(step=step, kind="detach", site=DETACH_SITE, module="D.aux",
                         upstream=["D.aux.weight", "G.fc2.weight"], effective=True, cut=2 * step,
                         op="detach", count=1, backward=2 * step))
        cuts.append(dict(step=step, kind="to_python", site=ITEM_SITE, module=None,
                         upstream=["D.out.weight"], effective=False, cut=2 * step + 1,
                         op="item", count=2, backward=None))
    tables = {
        "params": frame("params", params), "modules": frame("modules", modules),
        "cuts": frame("cuts", cuts), "saved": frame("saved", saved),
        "backward": frame("backward", backward), "memory": frame("memory", memory),
        "steps": frame("steps", [dict(step=s, detail=s % 2 == 0, amp_skipped=s == 1,
                                      grad_scale=32768.0 if s == 1 else None) for s in range(N_STEPS)]),
        "weights": frame("weights", [dict(step=2, param="G.fc2.weight", status="nonfinite")]),
        "limits": frame("limits", [dict(step=1, what="thread", site="thread worker", note="ran in another thread",
                                        count=3)]),
        "dist": frame("dist", [dict(rank=0, world_size=2, backend="gloo", wrapper="ddp", find_unused_parameters=True,
                                    static_graph=False, gradient_as_bucket_view=None, bucket_cap_mb=25.0)]),
        "numerics": frame("numerics", [dict(step=3, phase="forward", module="G.fc2", type="Linear", op="linear",
                                            site="train.py:42", what="nan", inputs="finite")]),
        "findings": frame("findings", FINDINGS),
    }
    meta = {"torch": "2.13.0", "device": "cpu", "model": "GAN(G, D)", "steps": N_STEPS,
            "created": "2025-01-01T00:00:00"}
    return tables, meta


def empty_run() -> tuple[dict[str, pd.DataFrame], dict]:
    return {name: frame(name, []) for name in TABLES}, {}


def big_run(n_steps: int = 10_000, n_params: int = 200) -> tuple[dict[str, pd.DataFrame], dict]:
    """One backward per step, n_params parameters: n_steps * n_params params rows, built vectorised."""
    rng = np.random.default_rng(0)
    names = np.array([f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(n_params)])
    mods = np.array([f"layer{i // 2}" for i in range(n_params)])
    n = n_steps * n_params
    step = np.repeat(np.arange(n_steps), n_params)
    pidx = np.tile(np.arange(n_params), n_steps)
    status = np.full(n, "flow", dtype=object)
    status[pidx == 3] = "none"
    status[pidx == 5] = "frozen"
    status[(pidx == 7) & (step % 100 == 0)] = "zero"
    status[(pidx == 9) & (step == n_steps - 1)] = "nonfinite"
    norm = 10.0 ** (-pidx / 50.0) * rng.uniform(0.5, 2.0, n)
    norm[status != "flow"] = np.nan
    norm[status == "zero"] = 0.0
    params = frame("params", {
        "step": step, "backward": step, "param": names[pidx], "module": mods[pidx],
        "status": status, "cause": np.where(status == "none", "detach", None),
        "site": np.where(status == "none", "train.py:10", None), "grad_norm": norm,
        "grad_maxabs": norm / 2, "arrival": pidx.astype(float), "numel": np.full(n, 1024),
        "kind": np.full(n, "parameter"),
    })
    steps = np.arange(n_steps)
    backward = frame("backward", {
        "step": steps, "backward": steps, "site": np.full(n_steps, "train.py:20"),
        "retain_graph": np.zeros(n_steps, bool), "saved_bytes": np.full(n_steps, 1 << 20),
        "retained_bytes": np.zeros(n_steps, int), "create_graph": np.zeros(n_steps, bool),
        "api": np.full(n_steps, "tensor.backward"), "t": steps * 0.01, "duration": np.full(n_steps, 0.003),
        "params_flow": np.full(n_steps, n_params - 2), "params_none": np.ones(n_steps, int),
        "params_zero": np.zeros(n_steps, int), "params_nonfinite": np.zeros(n_steps, int),
        "params_frozen": np.ones(n_steps, int), "error": np.full(n_steps, None),
    })
    m = 2 * n_steps
    memory = frame("memory", {
        "t": np.arange(m) * 0.005, "step": np.repeat(steps, 2),
        "event": np.tile(np.array(["forward", "backward"], dtype=object), n_steps),
        "live_saved_bytes": np.tile([1 << 20, 0], n_steps) + np.repeat(steps, 2) * 100,
        "rss_bytes": np.full(m, 300_000_000), "cuda_allocated_bytes": np.full(m, None),
    })
    mod_names = list(dict.fromkeys(mods))
    modules = frame("modules", {
        "step": np.repeat(steps[-1:], len(mod_names) + 1), "backward": np.repeat(steps[-1:], len(mod_names) + 1),
        "module": [""] + mod_names, "status": ["flow"] * (len(mod_names) + 1),
        "grad_norm": np.ones(len(mod_names) + 1), "saved_bytes": [None] * (len(mod_names) + 1),
        "parent": [None] + [""] * len(mod_names), "depth": [0] + [1] * len(mod_names),
        "order": np.arange(len(mod_names) + 1), "n_params": [1024 * n_params] + [2048] * len(mod_names),
        **{f"params_{s}": np.zeros(len(mod_names) + 1, int) for s in ("flow", "zero", "nonfinite", "none", "frozen")},
    })
    saved = frame("saved", {
        "step": np.repeat(steps, 3), "module": np.tile(np.array(["layer0", "layer1", "layer2"]), n_steps),
        "op": np.tile(np.array(["addmm", "relu", "addmm"]), n_steps), "nbytes": np.full(3 * n_steps, 4096),
        "kind": np.tile(np.array(["activation", "activation", "parameter"]), n_steps),
        "freed_by": np.full(3 * n_steps, "backward"),
    })
    tables = {
        "params": params, "modules": modules, "cuts": frame("cuts", []), "saved": saved,
        "backward": backward, "memory": memory,
        "steps": frame("steps", {"step": steps, "detail": steps % 10 == 0, "amp_skipped": np.zeros(n_steps, bool)}),
        "weights": frame("weights", []),
        "limits": frame("limits", []),
        "numerics": frame("numerics", []),
        "dist": frame("dist", []),
        "findings": frame("findings", FINDINGS[:1] + FINDINGS[4:5]),
    }
    return tables, {"torch": "2.13.0", "device": "cpu", "model": "MLP(100 layers)"}
