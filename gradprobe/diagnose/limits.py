"""What the probe could not see: one note per cause and region (torch.func, compile, other threads, other
saved_tensors_hooks). Pure pandas."""

from __future__ import annotations

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


def saved_hooks_shadowed(tables: dict, found: list[dict]) -> list[dict]:
    mem = tables.get("memory")
    if mem is None or mem.empty:
        return []
    sh = mem[mem["event"] == "hooks_shadowed"]
    rows = []
    for where, g in sh.groupby(sh["site"].astype(object).fillna("?"), sort=False):
        mods = sorted(set(g["note"].dropna()))
        inside = f" (in {', '.join(mods[:3])}{' ...' if len(mods) > 3 else ''})" if mods else ""
        rows.append({"kind": "saved_hooks_shadowed", "severity": "info", "site": where, "nbytes": None,
                     "step": int(g["step"].min()), "params": [],
                     "message": f"At {where}{inside} other saved_tensors_hooks (torch.utils.checkpoint, "
                                f"torch.autograd.graph.save_on_cpu) were active in {span(g['step'], 'step', last_step(tables))} and "
                                "took the saved tensors instead of gradprobe: those are missing from the saved "
                                "table, so saved bytes there are a lower bound (usually fine: that is what "
                                "checkpointing and offloading are for)."})
    return rows
