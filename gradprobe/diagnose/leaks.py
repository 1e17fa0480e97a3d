"""Graphs that outlive their step (graph_leak): accumulation, carried state, containers, create_graph,
retain_graph. Pure pandas."""

from __future__ import annotations

import pandas as pd

from ..text import human, plural


def _growth(dn, db, steps: int) -> str:
    """', growing by about 12 nodes and 1.5 KiB per step'; a growth under one unit per step is given over the
    whole span ('3 nodes over 10 steps'), never as 'about 0 nodes per step'."""
    grow = []
    if pd.notna(dn) and dn > 0:
        grow.append(f"about {round(dn / steps):,} nodes per step" if dn / steps >= 1 else
                    f"{int(dn):,} node{'s' if dn != 1 else ''} over {steps} steps")
    if pd.notna(db) and db > 0:
        grow.append(f"about {human(round(db / steps))} per step" if db / steps >= 1 else
                    f"{human(int(db))} over {steps} steps")
    return f", growing by {' and '.join(grow)}" if grow else ", not growing"


def graph_leak(tables: dict, found: list[dict]) -> list[dict]:
    mem = tables.get("memory")
    if mem is None or mem.empty or "leaked_graphs" not in mem:
        return []
    ends = mem[(mem["event"] == "step_end") & (mem["leaked_graphs"].fillna(0) > 0)]
    rows = []
    for (where, cause), g in ends.groupby([ends["leak_site"].astype(object).fillna("?"),
                                           ends["leak_cause"].astype(object).fillna("reference")], sort=False):
        g = g.sort_values("t", kind="stable")
        first, last = g.iloc[0], g.iloc[-1]
        growing = len(g) > 1 and (last["leaked_graphs"] > first["leaked_graphs"] or
                                  last["leaked_bytes"] > first["leaked_bytes"])
        if cause not in ("accumulation", "carried") and not growing:
            continue  # one graph kept by a variable that is not reassigned: not a leak
        nodes, nbytes = int(last["leaked_nodes"]), int(last["leaked_bytes"])
        steps = int(g["step"].iloc[-1] - g["step"].iloc[0])
        growth = _growth(last["leaked_nodes"] - g["leaked_nodes"].iloc[0],
                         last["leaked_bytes"] - g["leaked_bytes"].iloc[0], steps) if steps > 0 else ""
        since = str(last["note"]).split(";")[0] if pd.notna(last["note"]) else "?"
        held_bytes = (f" and {human(nbytes)} of saved tensors" if nbytes else
                      " (their saved tensors were freed by backward: the nodes themselves are what is kept)")
        kept = (f"{plural(int(last['leaked_graphs']), 'graph')} of earlier steps ({since}) were still alive at "
                f"the end of step {int(last['step'])}: at least {plural(nodes, 'autograd node')}{held_bytes}"
                f"{growth}.")
        held = last["note"] if pd.notna(last["note"]) and "held by" in str(last["note"]) else None
        if cause == "accumulation":
            msg = (f"{where} combines tensors from different steps (like `epoch_loss += loss`), so every step's "
                   f"graph hangs on the next: {kept} Accumulate `loss.item()` (or `loss.detach()`) instead.")
        elif cause == "carried":
            msg = (f"The forward at {where} is given a tensor from an earlier step's graph (a hidden state carried "
                   f"across batches without `.detach()`?), so each step's graph hangs on the previous one: {kept} "
                   "Detach what you carry over between batches (`hidden = tuple(h.detach() for h in hidden)`).")
        elif cause == "create_graph":
            msg = (f"The backward at {where} uses create_graph=True, so the gradients it leaves in `.grad` carry a "
                   f"graph that references the parameters (a reference cycle): {kept} Use "
                   "`torch.autograd.grad(..., create_graph=True)` for the higher-order term, or set the grads to "
                   "None after the step (`optimizer.zero_grad(set_to_none=True)`).")
        elif cause == "retain_graph":
            msg = (f"The backward at {where} used retain_graph=True and something still references those graphs, "
                   f"so their saved tensors stay alive: {kept} Drop retain_graph=True, or keep `.detach()`ed "
                   "tensors or `.item()` values instead of graph outputs.")
        elif held is not None:
            var = held.split("held by ", 1)[1]
            msg = (f"{where} keeps graph outputs of every step in {var}, so their graphs stay alive: {kept} Keep "
                   "`loss.item()` (or `.detach()`ed tensors) there instead.")
        else:
            msg = (f"Graphs built by the forward at {where} outlive their step: something keeps a reference to "
                   f"their outputs (a list of losses or outputs, a hidden state carried over): {kept} Keep "
                   "`.detach()`ed tensors or `.item()` values instead.")
        rows.append({"kind": "graph_leak", "severity": "warning", "message": msg, "site": where,
                     "nbytes": int(g["leaked_bytes"].max()), "step": int(g["step"].iloc[0]), "params": []})
    return rows
