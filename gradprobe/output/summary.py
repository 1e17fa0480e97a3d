"""Plain-text summary of a run, for terminals and logs. Pure pandas.

The memory headline and the "what was not recorded" lines are computed here once and used by
the summary, the HTML report and Jupyter's `_repr_html_`, so that they never disagree.
"""

from __future__ import annotations

import pandas as pd

from ..diagnose.finding import findings_from_table
from ..tables.counts import step_counts
from ..text import human_bytes, plural, with_source
from .merge import merged_ranks

KIND_ORDER = ("activation", "cast", "parameter", "buffer", "input")
FREEABLE = ("activation", "cast")  # what torch.no_grad() would not have saved


def _get(tables: dict, name: str) -> pd.DataFrame:
    df = tables.get(name)
    return pd.DataFrame() if df is None else df


def memory_headline(tables: dict) -> dict | None:
    """Peak live saved bytes in one step, and per-step saved bytes (median, max) by kind.

    Never a sum over steps. None when no tensor saved for backward was recorded.
    Keys: peak, peak_step, sampled, steps, by_kind {kind: (median, max)}, total, freeable, counterfactual.
    """
    saved, mem = _get(tables, "saved"), _get(tables, "memory")
    if saved.empty or "nbytes" not in saved:
        return None
    nb = saved["nbytes"].astype("float64").fillna(0)
    kind = saved["kind"].astype(object).where(saved["kind"].notna(), "?")
    keys = [saved["step"].to_numpy()]
    if "rank" in saved:  # a run merged from many ranks: per step of one rank, never a sum over ranks
        keys.insert(0, saved["rank"].to_numpy())
    per = nb.groupby(keys + [kind.to_numpy()]).sum().unstack(fill_value=0)
    kinds = [k for k in KIND_ORDER if k in per] + sorted(k for k in per if k not in KIND_ORDER)
    by_kind = {k: (float(per[k].median()), float(per[k].max())) for k in kinds if per[k].max() > 0}
    total = per.sum(axis=1)
    free = per[[k for k in FREEABLE if k in per]].sum(axis=1) if any(k in per for k in FREEABLE) else total * 0
    peak = peak_step = cf = peak_rank = None
    if len(mem):
        col = next((c for c in ("peak_saved_bytes", "live_saved_bytes") if c in mem and mem[c].notna().any()), None)
        if col is not None:
            v = mem[col].astype("float64")
            i = v.idxmax()
            peak, peak_step = float(v[i]), int(mem.loc[i, "step"])
            if "rank" in mem and mem["rank"].nunique() > 1:
                peak_rank = int(mem.loc[i, "rank"])
        if "peak_counterfactual_bytes" in mem and mem["peak_counterfactual_bytes"].notna().any():
            cf = float(mem["peak_counterfactual_bytes"].astype("float64").max())
    if peak is None:  # no memory rows: the largest step total is a lower bound of nothing; say per step only
        i = total.idxmax()
        peak_step = int(i[-1] if isinstance(i, tuple) else i)
    n_steps, _ = step_counts(tables)
    sampled = saved["step"].nunique()
    return {"peak": peak, "peak_step": peak_step, "peak_rank": peak_rank, "sampled": sampled,
            "steps": max(n_steps, sampled),
            "by_kind": by_kind, "total": (float(total.median()), float(total.max())),
            "freeable": (float(free.median()), float(free.max())), "counterfactual": cf}


def memory_lines(h: dict | None) -> list[str]:
    """The memory headline as text lines (the report prints the same lines)."""
    if h is None:
        return []
    b = lambda v: human_bytes(v, "n/a")  # noqa: E731
    of = f"{h['sampled']} sampled step" + ("" if h["sampled"] == 1 else "s") + f" of {h['steps']}"
    lines = [f"Memory saved for backward (in {of}):"]
    if h["peak"] is not None:
        on = "" if h.get("peak_rank") is None else f", rank {h['peak_rank']}"
        lines.append(f"  peak live in one step: {b(h['peak'])} (step {h['peak_step']}{on})"
                     + (f"; {b(h['counterfactual'])} had each graph been freed at its first backward"
                        if h["counterfactual"] is not None and h["counterfactual"] != h["peak"] else ""))
    med, mx = h["total"]
    lines.append(f"  saved in each step{' of one rank' if h.get('peak_rank') is not None else ''} "
                 f"(all its graphs, live or not at once): median {b(med)}, max {b(mx)}")
    for k, (med, mx) in h["by_kind"].items():
        lines.append(f"    {k}: median {b(med)}, max {b(mx)}")
    med, mx = h["freeable"]
    lines.append(f"  freeable per step (activation + cast, what torch.no_grad() would save): "
                 f"median {b(med)}, max {b(mx)}")
    return lines


def not_recorded(tables: dict, meta: dict) -> list[str]:
    """What this run did not record, and why (empty when everything asked for was recorded)."""
    meta = meta or {}
    track = meta.get("track")
    backward, limits = _get(tables, "backward"), _get(tables, "limits")
    out = []
    if track is not None and len(track) == 0:
        out.append("track=() was given: nothing was tracked (track any of 'grads', 'cuts', 'memory').")
    if backward.empty:
        why = "Nothing was recorded: no backward call ran while the probe was active"
        thread = limits[limits["what"] == "thread"] if len(limits) and "what" in limits else limits
        if len(thread):
            site = thread["site"].dropna()
            why += (" in the thread that entered it; a backward ran in another thread"
                    + (f" ({site.iloc[0]})" if len(site) else "") + ", which the probe does not observe.")
        else:
            why += (" (call .backward() inside `with probe:` or the decorated function; backwards in other "
                    "threads are not observed, nor in other processes: with Lightning's ddp_spawn or "
                    "torch.multiprocessing, use gradprobe.integrations.lightning.GradProbe or make the probe "
                    "inside the worker).")
        out.append(why)
        return out
    if track is not None and len(track):
        missing = [t for t in ("grads", "cuts", "memory") if t not in track]
        what = {"grads": "gradients", "cuts": "cuts", "memory": "saved tensors and memory"}
        if missing:
            out.append(f"Not tracked (track={list(track)}): " + ", ".join(what[m] for m in missing)
                       + "; findings about them cannot be made.")
    if (track is None or "memory" in track) and _get(tables, "saved").empty:
        out.append("No tensor saved for backward was recorded in the steps captured in detail.")
    return out


def _backward_calls(backward: pd.DataFrame, ranks: list[int]) -> str:
    if not ranks:
        return plural(len(backward), "backward call")
    per = backward.groupby("rank").size().reindex(ranks, fill_value=0) if "rank" in backward else None
    if per is None or per.nunique() == 1:
        return f"{plural(0 if per is None else int(per.iloc[0]), 'backward call')} on each rank"
    return "backward calls " + ", ".join(f"{int(n)} on rank {r}" for r, n in per.items())


def _status_counts(params: pd.DataFrame, ranks: list[int]) -> list[str]:
    """Parameters by status in their last backward; per rank in a merged run (never summed over ranks)."""
    keys = ["rank", "param"] if ranks and "rank" in params else ["param"]
    last = params.drop_duplicates(keys, keep="last")
    text = lambda df: ", ".join(  # noqa: E731
        f"{s} {int((df['status'] == s).sum())}" for s in ("flow", "zero", "nonfinite", "none", "frozen"))
    if keys == ["param"]:
        return ["Parameters by status in their last backward: " + text(last)]
    per = {r: text(g) for r, g in last.groupby("rank")}
    if len(set(per.values())) == 1:
        return [f"Parameters by status in their last backward, on each rank: {next(iter(per.values()))}"]
    return ["Parameters by status in their last backward, per rank:"] + [f"  rank {r}: {t}" for r, t in per.items()]


def summarize(tables: dict, meta: dict) -> str:
    params, backward = _get(tables, "params"), _get(tables, "backward")
    n_steps, n_detail = step_counts(tables)
    ranks = merged_ranks(meta, backward)
    detail = f" ({n_detail} in full detail)" if n_detail and n_detail != n_steps else ""
    on = f"{len(ranks)} ranks ({', '.join(map(str, ranks))}); " if ranks else ""
    lines = [f"gradprobe run: {on}{plural(n_steps, 'step')}{detail}, {_backward_calls(backward, ranks)}; "
             f"model {(meta or {}).get('model', '?')}"]
    missing = not_recorded(tables, meta)
    lines += missing
    if not params.empty:
        last = params.drop_duplicates("param", keep="last")
        lines += _status_counts(params, ranks)
        none = params[params["status"] == "none"]
        if not none.empty:
            lines.append("No gradient (cause at site: parameters):")
            for (cause, site), g in none.groupby(["cause", "site"], dropna=False, sort=False):
                where = "" if pd.isna(site) else f" at {with_source(site)}"
                names = list(dict.fromkeys(g["param"]))
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                if ranks and "rank" in g:
                    n = len(g[["rank", "backward"]].drop_duplicates())
                    rs = sorted(g["rank"].unique().tolist())
                    on = (" on rank " if len(rs) == 1 else " on ranks ") + ", ".join(map(str, rs))
                    lines.append(f"  {cause}{where}: {shown} (in {plural(n, 'backward call')}{on})")
                else:
                    lines.append(f"  {cause}{where}: {shown} (in {plural(g['backward'].nunique(), 'backward call')})")
        frozen = last.loc[last["status"] == "frozen", "param"].tolist()
        if frozen:
            lines.append(f"Frozen: {', '.join(frozen[:6])}{' ...' if len(frozen) > 6 else ''}")
    lines += memory_lines(memory_headline(tables))
    findings = findings_from_table(_get(tables, "findings")) if len(_get(tables, "findings")) else []
    if findings:
        lines.append(f"Findings ({len(findings)}):")
    elif backward.empty:
        lines.append("Findings: none could be made, because nothing was recorded (see above).")
    else:
        lines.append("Findings: none.")
    for f in findings:
        lines.append(f"  [{f.severity}] {f.kind}: {f.message}")
        src = with_source(f.site) if f.site else ""
        if src and src != f.site:
            lines.append(f"      at {src}")
    return "\n".join(lines)
