"""Memory diagnosis rules: saved/backward/memory tables in, findings out. Pure pandas, never touches torch.

Kinds: inplace_saved, retain_graph_unneeded, retain_graph_avoidable, graph_leak, unused_graph, saved_hooks_shadowed.
Every message names the line, the bytes (also human readable) and what to do.
"""

from __future__ import annotations

import logging
import weakref

import pandas as pd

from .text import human_bytes, span

log = logging.getLogger("gradprobe")


def human(n) -> str:
    """1536 -> '1.5 KiB (1,536 bytes)'."""
    return human_bytes(n, missing="an unknown number of bytes", exact=True)


def _seconds(s) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _col(df: pd.DataFrame, c: str) -> pd.Series:
    return df[c] if c in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def memory_findings(tables: dict) -> list[dict]:
    rows: list[dict] = []
    for rule in (_inplace, _retain, _leak, _unused, _shadowed):
        try:
            rows += rule(tables)
        except Exception as e:  # a broken rule must not hide the others
            log.warning(f"gradprobe: memory rule {rule.__name__} failed: {e!r}")
    return rows


def _inplace(tables: dict) -> list[dict]:
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
    rank = _col(bw, "rank")
    steps, changed = _col(bw, "opt_steps"), _col(bw, "grads_changed")
    info = {(rk, int(b)): (bool(cg), api, s, ch) for rk, b, cg, api, s, ch in
            zip(rank, bw["backward"], bw["create_graph"], bw["api"], steps, changed)}
    out = []
    for rk, b, later in zip(_col(r, "rank"), r["backward"], r["reused_by"]):
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


def _retain(tables: dict) -> list[dict]:
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
        calls = f"{len(g)} backward calls ({span(g['step'], 'step')})" if len(g) > 1 else f"backward {first['backward']}"
        calls += _sampled(tables)
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
            msg = (f"{where}: {calls} used retain_graph=True, but no later backward went through the retained "
                   f"graph: it kept {human(nbytes)} of saved tensors alive{how_long} after the backward, until "
                   f"{until}.{peak} Remove retain_graph=True: a loss computed by a new forward has its own graph.")
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
            msg = (f"{where}: {calls} kept the graph with retain_graph=True for backward {later}{at}, right after "
                   f"it and through the same graph ({human(nbytes)} held in between), with no optimizer step, "
                   f"zero_grad or other backward in between. Two losses from one forward: "
                   f"`(loss1 + loss2).backward()` gives the same gradients in one pass and frees the graph at once"
                   f"{peak}.")
            rows.append({"kind": "retain_graph_avoidable", "severity": "info", "message": msg, "site": where,
                         "nbytes": nbytes, "step": int(first["step"]), "params": []})
    return rows


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


def _sampled(tables: dict) -> str:
    """' (seen in 3 sampled steps of 60: saved tensors are recorded only on ...)' when the schedule sampled,
    else ''."""
    st = tables.get("steps")
    if st is None or st.empty or "detail" not in st:
        return ""
    st = st[~st["amp_skipped"].astype(bool)] if "amp_skipped" in st else st
    total = int(st["step"].nunique())
    detail = int(st.loc[st["detail"].astype(bool), "step"].nunique())
    if total == 0 or detail >= total:
        return ""
    return (f" (seen in {detail} sampled step{'s' if detail != 1 else ''} of {total}: saved tensors are "
            "recorded only on the steps the schedule captures in full)")


def _leak(tables: dict) -> list[dict]:
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
        kept = (f"{int(last['leaked_graphs'])} graph(s) of earlier steps ({since}) were still alive at "
                f"the end of step {int(last['step'])}: at least {nodes} autograd nodes and {human(nbytes)} of "
                f"saved tensors{growth}.")
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


def unused_graphs(tables: dict) -> pd.DataFrame:
    """One row per graph (forward) that no backward used and that is released, indexed by graph id:
    site, step, act (what no_grad would have saved), modules and params (what its saved tensors came from)."""
    saved = tables.get("saved")
    if saved is None or saved.empty or "graph" not in saved:
        return pd.DataFrame(columns=["site", "step", "act", "modules", "params"])
    global _last
    if _last is not None and _last[0]() is saved and _last[1] == len(saved):  # one diagnosis's rules share it
        return _last[2].copy()
    per = _unused_graphs(saved)
    _last = (weakref.ref(saved), len(saved), per)
    return per.copy()


_last = None


def _sets(rows: pd.DataFrame, col: str) -> dict:
    """graph id -> set of the column's distinct values (one pass over the distinct pairs)."""
    pairs = rows[["graph", col]].dropna().drop_duplicates()
    out: dict = {}
    for gid, v in zip(pairs["graph"].tolist(), pairs[col].tolist()):
        out.setdefault(gid, set()).add(v)
    return out


def _unused_graphs(saved: pd.DataFrame) -> pd.DataFrame:
    cols = pd.DataFrame({
        "graph": saved["graph"], "site": saved["site"], "step": saved["step"],
        "used": saved["backward"].notna(), "released": saved["freed_by"] != "alive",
        # what no_grad would save: storages that exist only because of the graph (never parameters/buffers)
        "act": saved["nbytes"].where(saved["kind"].isin(("activation", "cast")), 0),
        "module": _col(saved, "module"), "param": _col(saved, "param")})
    per = cols.groupby("graph", sort=False).agg(site=("site", "first"), step=("step", "min"), used=("used", "any"),
                                                released=("released", "all"), act=("act", "sum"))
    per = per[~per["used"] & per["released"] & (per["act"] > 0)]
    if per.empty:
        return per.assign(modules=pd.Series(dtype=object), params=pd.Series(dtype=object))
    mine = cols[cols["graph"].isin(per.index)]
    mods, pars = _sets(mine, "module"), _sets(mine, "param")
    per["modules"] = pd.Series([mods.get(gid, set()) for gid in per.index], index=per.index, dtype=object)
    per["params"] = pd.Series([pars.get(gid, set()) for gid in per.index], index=per.index, dtype=object)
    return per


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def cut_unused_graphs(tables: dict) -> dict:
    """(cut kind, cut site) -> the unused graphs (rows of unused_graphs) that an effective cut left unused:
    graphs of the cut's steps whose saved tensors came from the parameters it left without any gradient.
    A deliberate cut (those parameters got gradients from another backward, as in a GAN) is left out: its
    unused graph is plain waste that torch.no_grad() would save."""
    cuts, params = tables.get("cuts"), tables.get("params")
    if cuts is None or cuts.empty or params is None or params.empty or "upstream" not in cuts:
        return {}
    per = unused_graphs(tables)
    if per.empty:
        return {}
    got = set(params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    none = set(params.loc[params["status"] == "none", "param"].unique())
    eff = cuts[cuts["effective"].astype(bool) & (cuts["kind"] != "reentrant_checkpoint")]
    out = {}
    for key, g in eff.groupby(["kind", "site"], dropna=False, sort=False):
        cut_off = {p for ups in g["upstream"] for p in ups if p in none}
        if not cut_off or cut_off <= got:
            continue
        mods = {_module_of(p) for p in cut_off}
        near = pd.Series([bool(ps & cut_off) or bool(ms & mods) for ps, ms in zip(per["params"], per["modules"])],
                         index=per.index, dtype=bool)
        hit = per[per["step"].isin(set(g["step"])) & near]
        if len(hit):
            out[key] = hit
    return out


def cut_unused_text(hit: pd.DataFrame) -> str:
    """What a cut's finding says about the forward graphs it left unused."""
    n, each = len(hit), int(hit["act"].max())
    sites = ", ".join(dict.fromkeys(hit["site"].dropna().astype(str)))
    built = f"{n} graphs" if n > 1 else "a graph"
    total = f", {human(int(hit['act'].sum()))} over all {n}" if n > 1 else ""
    return (f" Because of this cut, the forward at {sites} built {built} that no backward used ({human(each)} "
            f"of activations each{total}); that is a consequence of the cut, not a reason to wrap the forward "
            "in torch.no_grad() (that would keep these parameters from ever training).")


def _unused(tables: dict) -> list[dict]:
    per = unused_graphs(tables)
    told = [gid for hit in cut_unused_graphs(tables).values() for gid in hit.index]
    if told:
        per = per[~per.index.isin(told)]  # told by the cut that left them unused: no no_grad advice
    rows = []
    for where, g in per.groupby(per["site"].astype(object).fillna("?"), sort=False):
        n = len(g)
        each = int(g["act"].max())
        times = f"{n} graphs" if n > 1 else "a graph"
        total = f" ({human(int(g['act'].sum()))} over all {n})" if n > 1 else ""
        msg = (f"The forward at {where} built {times} that no backward used (validation, metrics or logging "
               f"outside torch.no_grad()?), in {span(g['step'], 'step')}{_sampled(tables)}: each saved "
               f"up to {human(each)} of activations for nothing{total}. Wrap it in `with torch.no_grad():` (or "
               "`torch.inference_mode()`) to save that memory and time.")
        rows.append({"kind": "unused_graph", "severity": "warning", "message": msg, "site": where,
                     "nbytes": each, "step": int(g["step"].min()), "params": []})
    return rows


def _shadowed(tables: dict) -> list[dict]:
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
                                f"torch.autograd.graph.save_on_cpu) were active in {span(g['step'], 'step')} and "
                                "took the saved tensors instead of gradprobe: those are missing from the saved "
                                "table, so saved bytes there are a lower bound (usually fine: that is what "
                                "checkpointing and offloading are for)."})
    return rows

