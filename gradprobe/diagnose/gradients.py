"""Gradient rules: backwards PyTorch refused and parameters left without a gradient. Pure pandas."""

from __future__ import annotations

from ..tables.causes import cause_of, cut_label
from ..text import is_missing, records, span
from .common import CAUSE_TEXT, col, listed, module_label, sampled_note

_CHECKPOINT_FIX = ("none of the tensors passed to the reentrant `checkpoint(...)` at {site} requires grad, so "
                   "PyTorch cannot recompute its gradients and the parameters inside get none (the HF/peft pitfall "
                   "with frozen embeddings). Fix: `checkpoint(..., use_reentrant=False)`, or make an input require "
                   "grad (HF: `model.enable_input_require_grads()`)")


def backward_errors(tables: dict, found: list[dict]) -> list[dict]:
    """A backward PyTorch refused (its root does not require grad, a graph freed, an in-place change)."""
    backward = tables["backward"]
    rows: list[dict] = []
    for r in records(backward[backward["error"].notna()]):
        if r.get("cut_site"):  # refused because its root does not require grad
            why = f" The loss was cut off from the graph by {r['cut_site']}."
        elif "second time" in r["error"] or "already been freed" in r["error"]:
            try:
                why = _freed_graph(tables, r)
            except (KeyError, ValueError, TypeError):  # a run saved without these columns: PyTorch's message only
                why = ""
        else:
            why = ""
        first = r["error"].splitlines()[0].split(". ")[0].rstrip(".")
        rows.append({"kind": "backward_error", "severity": "error", "step": r["step"],
                     "site": r["site"], "params": [],
                     "message": f"backward {r['backward']} at {r['site']} failed: {first}.{why}"})
    return rows


def _sampling(tables: dict, detailed: set) -> tuple:
    """(backward calls in the run when per-parameter rows were sampled from them, else None; a backward
    without per-parameter rows in which every tracked tensor got a gradient, else None)."""
    bw = tables["backward"]
    ok = bw[bw["error"].isna()] if "error" in bw else bw
    of = len(ok) if len(ok) > len(detailed) else None
    others = ok[~ok["backward"].isin(detailed) & (col(ok, "api") != "autograd.grad")]  # grad: only its inputs
    full = others[(others["params_none"] == 0).fillna(False).astype(bool)] if "params_none" in others else others.iloc[:0]
    return of, (int(full["backward"].iloc[0]) if len(full) else None)


def _freed_graph(tables: dict, r: dict) -> str:
    """Which earlier backward freed the graph a failed backward reached, and the tensor that carried it across."""
    backward, saved = tables["backward"], tables["saved"]
    earlier = backward[(backward["backward"] < r["backward"]) & ~backward["retain_graph"].astype(bool)]
    graph = col(backward, "freed_graph")[backward["backward"] == r["backward"]].dropna()
    rows = saved[saved["graph"] == int(graph.iloc[0])] if len(graph) and not saved.empty else saved.iloc[:0]
    by = rows.loc[(rows["freed_by"] == "backward") & (rows["last_backward"] < r["backward"]), "last_backward"]
    if by.empty:  # not recorded (memory off, or not a detail step): the last backward that freed its graph
        if earlier.empty:
            return ""
        last = earlier.iloc[-1]
        return (f" An earlier backward without `retain_graph=True` freed it: the last one was backward "
                f"{last['backward']} at {last['site']}. A tensor of its graph was used again (an RNN hidden "
                f"state not detached between batches, or a `fake` shared by two losses): `.detach()` it there.")
    b = int(by.max())
    freer = records(backward[backward["backward"] == b])
    freer_site = freer[0]["site"] if freer else None
    made, made_step = rows["site"].dropna().iloc[0] if rows["site"].notna().any() else None, int(rows["step"].min())
    carried = r.get("carried_site")
    freed = f"backward {b}" + (f" at {freer_site}" if freer_site else "")
    text = (f" It reached the graph built by the forward at {made} (step {made_step}), which {freed} had "
            f"already freed (it ran without `retain_graph=True`)")
    if carried and carried == made:
        return (text + f". The forward at {carried} was given a tensor of that earlier graph: a state carried "
                f"from one iteration to the next (an RNN hidden state not detached between batches). Detach it "
                f"before that forward (`hidden = hidden.detach()`, or `repackage_hidden(hidden)`).")
    if not carried:  # its roots are in that graph: a second loss of that forward, or the same loss again
        return (text + f": this backward started in that same graph (a second loss from the same forward, or the "
                f"same loss backward twice). Call backward once on their sum (`(loss1 + loss2).backward()`), or "
                f"pass `retain_graph=True` to {freed} if both backwards must go through that graph.")
    return (text + f"; the forward at {carried} was given a tensor made there: one tensor shared by two losses "
            f"(a GAN's `fake` used by the discriminator loss without `.detach()` and again by the generator loss, "
            f"or two outputs of one forward). Detach it where the first loss must not reach back "
            f"(`D(fake.detach())`), call backward once on the sum of the losses, or pass `retain_graph=True` to "
            f"{freed} if the second backward must go through that graph.")


def no_gradient(tables: dict, found: list[dict]) -> list[dict]:
    """Parameters that got no gradient, one finding per (cause, line): error when they never got one."""
    params, cuts = tables["params"], tables["cuts"]
    rows: list[dict] = []
    if params.empty:
        return rows
    # sets and lists of distinct names from unique() (vectorised), not from iterating every row
    got = set(params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    none = params[params["status"] == "none"]
    sampled = sampled_note(tables)
    of, all_got = _sampling(tables, set(params["backward"].unique()))
    cut_cause = None  # cause of each cut row, computed once when a group needs it
    for (cause, where), g in none.groupby(["cause", "site"], dropna=False, sort=False):
        names = list(g["param"].unique())  # in order of first appearance, like dict.fromkeys
        never = [n for n in names if n not in got] if all_got is None else []
        severity = "error" if never else "info"
        cause = None if is_missing(cause) else cause
        where = None if is_missing(where) else where
        if cause in CAUSE_TEXT:
            why = CAUSE_TEXT[cause]
        elif cause == "reentrant_checkpoint":
            why = _CHECKPOINT_FIX.format(site=where)
        else:
            if cut_cause is None:
                cut_cause = cuts["kind"].map(cause_of)
            desc = records(cuts.loc[(cuts["site"] == where) & (cut_cause == cause)].head(1))
            first = desc[0] if desc else {"kind": cause, "op": None, "module": None}
            why = f"flow stopped by {cut_label(first['kind'], first['op'])} at {where}" + module_label(
                tables, first["module"])
        tail = "" if never else " They received gradients in other backward calls" + (
            f" (in backward {all_got}, not sampled in detail, every tracked tensor got one)" if all_got is not None
            and not set(names) <= got else "") + ", so this looks deliberate."
        tail += sampled
        rows.append({"kind": "no_gradient", "severity": severity, "site": where,
                     "step": int(g["step"].min()), "params": names,
                     "message": f"{listed(names)} received no gradient in {span(g['backward'].unique(), 'backward', of=of)}: "
                                f"{why}.{tail}"})
    return rows
