"""What the probe could not see: one note per cause and region (torch.func, compile, other threads, other
saved_tensors_hooks). Pure pandas."""

from __future__ import annotations

import pandas as pd

from ..tables.counts import last_step
from ..text import span

_LIMIT_TEXT = {
    "torch.func": "torch.func transforms ran their own backwards (grad, vmap, jacrev...): the probe steps aside "
                  "there, so their gradients and saved tensors are not in the tables",
    "compile": "torch.compile ran compiled regions: what ran inside them is not seen per op (cuts, saved tensors, "
               "module output norms); parameters' gradients are still recorded",
    "thread": "forward/backward ran in another thread than the one that entered the probe ({sites}): backwards "
              "and gradients there are recorded, cuts and module detail (thread-local) are not",
}


def probe_limits(tables: dict, found: list[dict]) -> list[dict]:
    limits = tables.get("limits")
    if limits is None or limits.empty:
        return []
    rows = []
    for what, g in limits.groupby("what", sort=False):
        sites = ", ".join(dict.fromkeys(g["site"].dropna()))
        text = _LIMIT_TEXT.get(what)
        msg = text.format(sites=sites or "unnamed") if text else str(g["note"].iloc[0])
        rows.append({"kind": "probe_limit", "severity": "info", "site": None, "step": int(g["step"].min()),
                     "params": [], "message": f"Not seen by the probe: {msg} ({int(g['count'].sum())} times)."})
    return rows


_HOOKS_TEXT = {
    "checkpoint": ("the `checkpoint(...)` call at {where}", "torch.utils.checkpoint's saved_tensors_hooks",
                   "checkpointing is for"),
    "save_on_cpu": ("{where}", "torch.autograd.graph.save_on_cpu's saved_tensors_hooks", "offloading is for"),
    "other": ("{where}", "other saved_tensors_hooks", "those hooks are for"),
}


def saved_hooks_shadowed(tables: dict, found: list[dict]) -> list[dict]:
    """One note per cause and region: per `checkpoint(...)` call (not per line inside the checkpointed block),
    and one for save_on_cpu or other hooks, naming the lines."""
    mem = tables.get("memory")
    if mem is None or mem.empty:
        return []
    sh = mem[mem["event"] == "hooks_shadowed"]
    if sh.empty:
        return []
    hooks = sh["hooks"].astype(object).fillna("other") if "hooks" in sh else pd.Series("other", index=sh.index)
    sites = sh["site"].astype(object).fillna("?")
    region = sites.where(hooks == "checkpoint", "")  # a checkpoint call is a region; other hooks: one per kind
    rows = []
    for (kind, _), g in sh.groupby([hooks, region], sort=False):
        lines = list(dict.fromkeys(sites[g.index]))
        where = ", ".join(lines[:3]) + (f" and {len(lines) - 3} more lines" if len(lines) > 3 else "")
        at, whose, purpose = _HOOKS_TEXT.get(kind, _HOOKS_TEXT["other"])
        mods = sorted(set(g["note"].dropna()))
        inside = f" (in {', '.join(mods[:3])}{' ...' if len(mods) > 3 else ''})" if mods else ""
        rows.append({"kind": "saved_hooks_shadowed", "severity": "info", "site": lines[0], "nbytes": None,
                     "step": int(g["step"].min()), "params": [],
                     "message": f"Under {at.format(where=where)}{inside}, {whose} took the tensors saved for "
                                f"backward in {span(g['step'], 'step', last_step(tables))} instead of gradprobe: "
                                "they are missing from the saved table, so saved bytes there are a lower bound "
                                f"(usually fine: that is what {purpose})."})
    return rows
