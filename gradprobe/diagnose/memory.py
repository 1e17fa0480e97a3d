"""Memory rules: in-place writes into saved tensors, and retain_graph=True (unneeded or avoidable).
Every message names the line, the bytes (also human readable) and what to do. Pure pandas."""

from __future__ import annotations

import pandas as pd

from ..tables.counts import last_step
from ..text import human, span
from .common import col, sampled_steps


def _seconds(s) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def inplace_saved(tables: dict, found: list[dict]) -> list[dict]:
    saved = tables.get("saved")
    if saved is None or saved.empty or "inplace_site" not in saved:
        return []
    hit = saved[saved["inplace_site"].notna()]
    # only about a graph that a later backward went through (or that PyTorch refused: inplace_backward is
    # then the failed backward), or one still alive while recording goes on (a backward may come); a graph
    # dropped, or left at the end, without any backward after the write made no wrong gradient
    mem = tables.get("memory")
    ended = mem is None or mem.empty or mem.sort_values("t", kind="stable")["event"].iloc[-1] == "exit"
    later = hit["inplace_backward"].notna()
    if not ended:
        later |= hit["freed_by"] == "alive"
    backward = tables.get("backward")
    refused = {}  # step -> first backward PyTorch refused for an in-place change (its check can run before
    # the probe's unpack hook sees the tensor: inplace_backward is then missing)
    if backward is not None and not backward.empty and "error" in backward:
        err = backward[backward["error"].astype(object).fillna("").str.contains("modified by an inplace")]
        refused = err.groupby("step")["backward"].min().to_dict()
    if refused:
        later |= (hit["inplace_kind"] == "version") & (hit["freed_by"] != "backward") & hit["step"].isin(refused)
    hit = hit[later]
    rows = []
    for (where, kind), g in hit.groupby(["inplace_site", "inplace_kind"], sort=False):
        nbytes = int(g.drop_duplicates("storage")["storage_bytes"].sum())
        first = g.iloc[0]
        what = f"{first['op'] or 'an op'}" + (f" in {first['module'] or 'the root module'}" if pd.notna(
            first["module"]) else "") + f" (shape {first['shape']}, saved by the forward at {first['site']})"
        used = g["inplace_backward"].dropna()
        params = sorted(set(g["param"].dropna()))
        if kind == "data":
            after = (f" Backward {int(used.min())} then used the modified values, so its gradients are wrong."
                     if len(used) else " Any backward through this graph will use the modified values.")
            msg = (f"{where} wrote in place through `.data` into a tensor saved for backward by {what}, "
                   f"{human(nbytes)}. Autograd cannot see `.data` writes, so gradients come out silently wrong "
                   f"and nothing raises.{after} Modify a copy instead (`y = x.detach().clone()`), or do the write "
                   "after backward.")
            severity = "error"
        else:
            failed = None
            if backward is not None and len(used) and "error" in backward:
                b = backward[backward["backward"].isin(used.astype("int64").tolist()) & backward["error"].notna()]
                failed = int(b["backward"].iloc[0]) if len(b) else None
            if failed is None and not len(used) and int(g["step"].min()) in refused:
                failed = int(refused[int(g["step"].min())])
            tail = (f" Backward {failed} raised that error." if failed is not None else
                    " The next backward through this graph will raise it.")
            msg = (f"{where} modified in place (through `.detach()`, under torch.no_grad() or an in-place op) a "
                   f"tensor saved for backward by {what}, {human(nbytes)}. PyTorch raises 'one of the variables "
                   f"needed for gradient computation has been modified by an inplace operation' at backward.{tail} "
                   "Write into a copy (`x.detach().clone()`) or use the out-of-place op (`x = x * 2` instead of "
                   "`x.mul_(2)`).")
            severity = "warning"
        rows.append({"kind": "inplace_saved", "severity": severity, "message": msg, "site": where,
                     "nbytes": nbytes, "step": int(g["step"].min()), "params": params})
    return rows


def _retain_verdicts(bw: pd.DataFrame, r: pd.DataFrame) -> pd.Series:
    """Per retained backward: `unneeded` (no later backward used the graph), `avoidable` (the next backward
    used it with nothing in between: two losses of one forward) or `needed` (an optimizer step, zero_grad or
    clipping, another backward in between, a create_graph backward or autograd.grad reusing it)."""
    rank = col(bw, "rank")
    steps, changed = col(bw, "opt_steps"), col(bw, "grads_changed")
    info = {(rk, int(b)): (bool(cg), api, s, ch) for rk, b, cg, api, s, ch in
            zip(rank, bw["backward"], bw["create_graph"], bw["api"], steps, changed)}
    out = []
    for rk, b, later in zip(col(r, "rank"), r["backward"], r["reused_by"]):
        if pd.isna(later):
            out.append("unneeded")
            continue
        this, nxt = info.get((rk, int(b))), info.get((rk, int(later)))
        if this is None or nxt is None or this[1] == "autograd.grad" or int(later) != int(b) + 1:
            out.append("needed")  # another backward in between, or autograd.grad then backward
        elif nxt[0] or nxt[1] == "autograd.grad":
            out.append("needed")  # a gradient penalty / higher-order term: no sum of losses replaces it
        elif pd.notna(this[2]) and pd.notna(nxt[2]) and int(this[2]) != int(nxt[2]):
            out.append("needed")  # an optimizer step in between: the second loss must see the new weights' graph
        elif pd.notna(nxt[3]) and bool(nxt[3]):
            out.append("needed")  # zero_grad, clipping or another change to the gradients in between
        else:
            out.append("avoidable")
    return pd.Series(out, index=r.index, dtype=object)


def retain_graph(tables: dict, found: list[dict]) -> list[dict]:
    bw = tables.get("backward")
    if bw is None or bw.empty or "reused_by" not in bw:
        return []
    # create_graph implies retain_graph (the higher-order graph is the point): never advice to drop it
    r = bw[bw["retain_graph"].astype(bool) & ~bw["create_graph"].astype(bool) & (bw["retained_bytes"].fillna(0) > 0)]
    if r.empty:
        return []
    verdict = _retain_verdicts(bw, r)
    rows = []
    for (where, what), g in r.groupby([r["site"].astype(object).fillna("?"), verdict], sort=False):
        if what == "needed":
            continue  # an optimizer step, zero_grad or other work between the backwards: retain_graph is needed
        first = g.iloc[0]
        nbytes = int(g["retained_bytes"].max())
        many = len(g) > 1
        calls = (f"{len(g)} backward calls ({span(g['step'], 'step', last_step(tables))})" if many
                 else f"backward {first['backward']}")
        at_site = bw[(bw["site"].astype(object) == where) & bw["retain_graph"].astype(bool)
                     & ~bw["create_graph"].astype(bool)]
        if len(at_site) > len(g):  # retain_graph is known for every backward, the memory only where sampled
            calls = f"{len(at_site)} backward calls with retain_graph=True here, of which the measured {calls}"
        calls += sampled_steps(tables)
        if what == "unneeded":
            held = g["retained_until"] - g["t"] - g["duration"].fillna(0)
            how_long = (f" for {_seconds(float(held.max()))}" if held.notna().any() else "")
            until = first["released_by"] if pd.notna(first["released_by"]) else "the end of the run"
            if until == "alive":
                until = "the end of the recording (still alive)"
            elif until.startswith("backward"):
                until = until + " released it"
            saving = g["retain_saving_bytes"].max()
            peak = (f" Without it the peak of saved tensors in that time would have been {human(saving)} lower."
                    if pd.notna(saving) and saving > 0 else "")
            if many:
                kept = (f"each kept up to {human(nbytes)} of saved tensors alive after its backward"
                        f"{how_long.replace(' for ', ' (for up to ')}{')' if how_long else ''}; the first until "
                        f"{until}.")
            else:
                kept = f"it kept {human(nbytes)} of saved tensors alive{how_long} after the backward, until {until}."
            msg = (f"{where}: {calls} used retain_graph=True, but no later backward went through the retained "
                   f"graph{'s' if many else ''}: {kept}{peak} Remove retain_graph=True: a loss computed by a new forward has its own "
                   "graph.")
            rows.append({"kind": "retain_graph_unneeded", "severity": "warning", "message": msg, "site": where,
                         "nbytes": nbytes, "step": int(first["step"]), "params": []})
        else:
            later = int(first["reused_by"])
            other = bw.loc[bw["backward"] == later, "site"]
            at = f" at {other.iloc[0]}" if len(other) and pd.notna(other.iloc[0]) else ""
            saving = g["retain_peak_saving_bytes"].max() if "retain_peak_saving_bytes" in g else None
            peak = (f"; the peak of saved tensors would be {human(saving)} lower" if pd.notna(saving) and saving > 0
                    else "; the overall peak of saved tensors stays the same (the forward that built the graph "
                         "is the peak), but the graph is walked once instead of twice")
            nxt = (f"each for the very next backward through the same graph (the first: backward {later}{at}), up to "
                   f"{human(nbytes)} held in between" if many else
                   f"for backward {later}{at}, right after it and through the same graph ({human(nbytes)} held in "
                   "between)")
            msg = (f"{where}: {calls} kept the graph with retain_graph=True {nxt}, with no optimizer step, "
                   f"zero_grad or other backward in between. Two losses from one forward: "
                   f"`(loss1 + loss2).backward()` gives the same gradients in one pass and frees the graph at once"
                   f"{peak}.")
            rows.append({"kind": "retain_graph_avoidable", "severity": "info", "message": msg, "site": where,
                         "nbytes": nbytes, "step": int(first["step"]), "params": []})
    return rows
