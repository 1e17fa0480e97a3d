"""Diagnosis rules: tables in, findings table out. Pure pandas, never touches torch."""

from __future__ import annotations

import pandas as pd

from .cuts import cause_of, cut_label
from .finding import sort_findings
from .memdiag import cut_unused_graphs, cut_unused_text, memory_findings
from .numdiag import numerics_findings
from .schema import frame
from .text import is_missing, records, span


def _names(params: list[str], shown: int = 1) -> str:
    head = ", ".join(f"`{p}`" for p in params[:shown])
    more = len(params) - shown
    return head + (f" and {more} more" if more > 0 else "")


_CAUSE_TEXT = {
    "not_in_graph": "their module ran in forward but nothing of it reached the loss",
    "not_used": "their module never ran in forward",
}
_CHECKPOINT_FIX = ("none of the tensors passed to the reentrant `checkpoint(...)` at {site} requires grad, so "
                   "PyTorch cannot recompute its gradients and the parameters inside get none (the HF/peft pitfall "
                   "with frozen embeddings). Fix: `checkpoint(..., use_reentrant=False)`, or make an input require "
                   "grad (HF: `model.enable_input_require_grads()`)")


def gradient_findings(tables: dict) -> list[dict]:
    params, cuts, backward = tables["params"], tables["cuts"], tables["backward"]
    rows: list[dict] = []
    # backward refused by PyTorch because its root does not require grad
    for r in records(backward[backward["error"].notna()]):
        why = (f" The loss was cut off from the graph by {r['cut_site']}." if r.get("cut_site")
               else "")
        rows.append({"kind": "backward_error", "severity": "error", "step": r["step"],
                     "site": r["site"], "params": [],
                     "message": f"backward {r['backward']} at {r['site']} failed: {r['error'].splitlines()[0]}."
                                f"{why}"})
    if params.empty:
        return rows
    # sets and lists of distinct names from unique() (vectorised), not from iterating every row
    got = set(params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    none = params[params["status"] == "none"]
    sampled = sampled_note(tables)
    cut_cause = None  # cause of each cut row, computed once when a group needs it
    for (cause, where), g in none.groupby(["cause", "site"], dropna=False, sort=False):
        names = list(g["param"].unique())  # in order of first appearance, like dict.fromkeys
        never = [n for n in names if n not in got]
        severity = "error" if never else "info"
        cause = None if is_missing(cause) else cause
        where = None if is_missing(where) else where
        if cause in _CAUSE_TEXT:
            why = _CAUSE_TEXT[cause]
        elif cause == "reentrant_checkpoint":
            why = _CHECKPOINT_FIX.format(site=where)
        else:
            if cut_cause is None:
                cut_cause = cuts["kind"].map(cause_of)
            desc = records(cuts.loc[(cuts["site"] == where) & (cut_cause == cause)].head(1))
            first = desc[0] if desc else {"kind": cause, "op": None, "module": None}
            why = f"flow stopped by {cut_label(first['kind'], first['op'])} at {where}" + module_label(
                tables, first["module"])
        tail = "" if never else " They received gradients in other backward calls, so this looks deliberate."
        tail += sampled
        rows.append({"kind": "no_gradient", "severity": severity, "site": where,
                     "step": int(g["step"].min()), "params": names,
                     "message": f"{_names(names)} received no gradient in {span(g['backward'].unique(), 'backward')}: "
                                f"{why}.{tail}"})
    none_params = set(none["param"].unique())
    effective = cuts[cuts["effective"] & (cuts["kind"] != "reentrant_checkpoint")]  # told by no_gradient
    unused = cut_unused_graphs(tables) if len(effective) else {}  # forward graphs a cut left unused
    for (kind, where), g in effective.groupby(["kind", "site"], dropna=False, sort=False):
        r = records(g.head(1))[0]
        cut_off = list(dict.fromkeys(p for ups in g["upstream"] for p in ups if p in none_params))
        deliberate = all(p in got for p in cut_off)
        steps = sorted(set(g["step"]))
        hit = unused.get((kind, where))
        extra = cut_unused_text(hit) if hit is not None else ""
        nbytes = int(hit["act"].max()) if hit is not None else None
        if not deliberate:
            # one finding per root cause: the no_gradient error at this line already names the cut and the
            # parameters; it takes the advice and the graph the cut left unused instead of a second finding
            same = [x for x in rows if x["kind"] == "no_gradient" and x["severity"] == "error"
                    and x["site"] == where and set(cut_off) <= set(x["params"])]
            if same:
                same[0]["message"] += " Nothing else gave them a gradient: if they should train, remove the cut." + extra
                same[0]["nbytes"] = nbytes
                continue
        rows.append({"kind": "detach_cut", "severity": "info" if deliberate else "warning",
                     "site": r["site"], "step": steps[0], "params": cut_off, "nbytes": nbytes,
                     "message": f"{cut_label(kind, r['op'])} at {r['site']}{module_label(tables, r['module'])}"
                                f" stopped gradient flow to "
                                f"{_names(cut_off, 2)} in {span(steps, 'step')}."
                                + (" Those parameters got gradients from another backward, as in a GAN's "
                                   "discriminator step: fine if intended." if deliberate else
                                   " Nothing else gave them a gradient: if they should train, remove the cut.")
                                + extra})
    skipped = _amp_skipped(tables)
    bad = params[(params["status"] == "nonfinite") & ~params["step"].isin(skipped)]
    if not bad.empty:
        first = bad.sort_values(["backward", "arrival"]).iloc[0]
        n = bad.loc[bad["backward"] == first["backward"], "param"].nunique()
        rows.append({"kind": "nonfinite_grad", "severity": "error", "site": None, "step": int(first["step"]),
                     "params": [first["param"]],
                     "message": f"NaN/Inf gradient first appeared at `{first['param']}` in backward "
                                f"{first['backward']} (step {first['step']}), {n} parameter(s) affected; "
                                f"the layers nearest the loss get gradients first, so look there."})
    return rows


def sampled_note(tables: dict) -> str:
    """` (Seen in 6 sampled steps of 60; ...)` when per-parameter detail was sampled, else ``."""
    backward = tables["backward"]
    if backward.empty or "detail" not in backward or backward["detail"].isna().all():
        return ""
    total = int(backward["step"].nunique())
    detail = int(backward.loc[backward["detail"].fillna(False).astype(bool), "step"].nunique())
    if detail >= total:
        return ""
    return (f" (Seen in {detail} sampled step{'s' if detail != 1 else ''} of {total}; whether a gradient "
            f"arrived was checked in all {total}: see the backward table's params_none.)")


def _amp_skipped(tables: dict) -> set:
    steps = tables.get("steps")
    if steps is None or steps.empty:
        return set()
    return set(steps.loc[steps["amp_skipped"], "step"])


def weight_findings(tables: dict) -> list[dict]:
    """Parameters that an optimizer step made NaN/Inf: training cannot recover from that."""
    weights = tables.get("weights")
    if weights is None or weights.empty:
        return []
    first = int(weights["step"].min())
    names = list(dict.fromkeys(weights.sort_values("step")["param"]))
    return [{"kind": "nonfinite_weights", "severity": "error", "site": None, "step": first, "params": names,
             "message": f"{_names(names, 2)} were NaN/Inf themselves by step {first} (checked when a sampled "
                        "backward found non-finite gradients): an optimizer step before it wrote them, and every "
                        "forward since computes NaN. Look at the learning rate and the gradients of the steps "
                        "before, and clip them (`clip_grad_norm_`)."}]


def amp_findings(tables: dict) -> list[dict]:
    """GradScaler's own overflow steps: expected with AMP, info (the scale is lowered and the step skipped)."""
    steps = tables.get("steps")
    if steps is None or steps.empty:
        return []
    hit = steps[steps["amp_skipped"]]
    if hit.empty:
        return []
    scale = hit["grad_scale"].dropna()
    after = f"; the scale is now {scale.iloc[-1]:g}" if len(scale) else ""
    return [{"kind": "amp_skipped_step", "severity": "info", "site": None, "step": int(hit["step"].min()),
             "params": [],
             "message": f"GradScaler skipped {span(hit['step'], 'step')}: it found inf/NaN gradients, lowered the "
                        f"scale and did not call optimizer.step(){after}. This is how AMP finds its scale; a few "
                        "skips are normal, a skip every step means the loss or the model overflows."}]


_LIMIT_TEXT = {
    "torch.func": "torch.func transforms ran their own backwards (grad, vmap, jacrev...): the probe steps aside "
                  "there, so their gradients and saved tensors are not in the tables",
    "compile": "torch.compile ran compiled regions: what ran inside them is not seen per op (cuts, saved tensors, "
               "module output norms); parameters' gradients are still recorded",
    "thread": "forward/backward ran in another thread than the one that entered the probe ({sites}): backwards "
              "and gradients there are recorded, cuts and module detail (thread-local) are not",
}


def limit_findings(tables: dict) -> list[dict]:
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


def module_label(tables: dict, module) -> str:
    """` (in Generator.forward)` / ` (in heads.aux: Linear.forward)`; empty when outside any module."""
    if is_missing(module):
        return ""
    mods = tables["modules"]
    types = mods.loc[mods["module"] == module, "type"].dropna() if "type" in mods else []
    kind = types.iloc[0] if len(types) else None
    if kind is None:
        return f" (in {module or 'the model'})"
    return f" (in {module}: {kind}.forward)" if "." in module else f" (in {kind}.forward)"


def diagnose(tables: dict) -> pd.DataFrame:
    rows = numerics_findings(tables, gradient_findings(tables) + weight_findings(tables) + amp_findings(tables) + limit_findings(tables) + memory_findings(tables))
    return sort_findings(frame("findings", rows))
