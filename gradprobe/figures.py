"""Plotly figures built from the run tables (see schema.py). Pure pandas/plotly: never torch.

Every figure aggregates with pandas/numpy first, so a 10,000-step run still plots a few
thousand points, and says in its title when it binned. An empty table gives a figure that
explains why it is empty rather than an error or a blank axis.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .text import human_bytes

# status -> (legend label, colour, marker symbol); `flow` is drawn as norms, the rest never as 0
STATUS_STYLE = {
    "flow": ("gradient flowed", "#2a9d8f", "circle"),
    "zero": ("exactly zero", "#f4a261", "circle-open"),
    "nonfinite": ("NaN / Inf", "#d62828", "diamond"),
    "none": ("no gradient", "#7b2cbf", "x"),
    "frozen": ("frozen (requires_grad=False)", "#8d99ae", "square-open"),
}
KIND_COLOUR = {"activation": "#457b9d", "cast": "#6a8fb3", "parameter": "#2a9d8f", "buffer": "#8ab17d",
               "input": "#f4a261"}
SEVERITY_STYLE = {"error": ("#d62828", "x"), "warning": ("#f4a261", "triangle-up"), "info": ("#457b9d", "circle")}
MAX_COLUMNS = 500  # heatmap columns (steps) before binning
MAX_POINTS = 2000  # points per timeline trace before binning
MAX_PANELS = 4  # backward panels in the branches figure
TEMPLATE = "plotly_white"


def make_figures(tables: dict[str, pd.DataFrame], meta: dict | None = None) -> dict[str, go.Figure]:
    """All report figures, keyed by name, in reading order."""
    t = tables
    empty = pd.DataFrame()
    get = lambda name: t.get(name, empty)  # noqa: E731
    return {
        "flow_by_layer": flow_by_layer(get("params")),
        "flow_over_time": flow_over_time(get("params")),
        "branches": branches(get("modules"), get("backward")),
        "cuts": cuts_figure(get("cuts")),
        "saved_memory": saved_memory(get("saved")),
        "memory_timeline": memory_timeline(get("memory"), get("findings"), get("saved")),
        "no_grad_retain": no_grad_retain(get("backward"), get("findings")),
    }


def _note(title: str, text: str) -> go.Figure:
    """A figure with no data that says why: an empty table must not look like a bug."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555"))
    fig.update_layout(title=title, template=TEMPLATE, height=220,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def _layout(fig: go.Figure, title: str, height: int, legend_top: bool = False) -> go.Figure:
    """Common look; the legend goes on top only where no subplot titles could collide with it."""
    legend = (dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1) if legend_top
              else dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01))
    fig.update_layout(title=dict(text=title, x=0.01), template=TEMPLATE, height=height,
                      margin=dict(l=60, r=30, t=80, b=60), legend=legend)
    return fig


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _flow_norms(params: pd.DataFrame) -> np.ndarray:
    """grad_norm where a finite, non-zero gradient arrived; NaN elsewhere (never 0)."""
    norm = params["grad_norm"].to_numpy(dtype=float, na_value=np.nan)
    ok = (params["status"] == "flow").to_numpy(dtype=bool, na_value=False) & np.isfinite(norm) & (norm > 0)
    return np.where(ok, norm, np.nan)


def flow_by_layer(params: pd.DataFrame) -> go.Figure:
    """Mean and max gradient norm per parameter in forward order, with no/zero/NaN/frozen marked."""
    title = "Gradient flow by parameter (forward order)"
    if params.empty:
        return _note(title, "No backward was recorded: no parameter rows.")
    codes, names = pd.factorize(params["param"])  # order of first appearance = forward order
    names = np.asarray(names, dtype=object)
    k = len(names)
    norms = pd.Series(_flow_norms(params))
    agg = norms.groupby(codes).agg(["mean", "max", "count"]).reindex(range(k))
    total = np.bincount(codes, minlength=k)
    status = params["status"].to_numpy(dtype=object, na_value="none")

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.78, 0.22], vertical_spacing=0.04)
    hover = [f"{n}<br>flow in {int(c)}/{tot} backwards" for n, c, tot in zip(names, agg["count"].fillna(0), total)]
    fig.add_trace(go.Scatter(x=names, y=agg["mean"], mode="lines+markers", name="mean ‖grad‖",
                             line=dict(color=STATUS_STYLE["flow"][1]), hovertext=hover,
                             hovertemplate="%{hovertext}<br>mean %{y:.3g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=names, y=agg["max"], mode="markers", name="max ‖grad‖",
                             marker=dict(color="#264653", symbol="triangle-up", size=7), hovertext=hover,
                             hovertemplate="%{hovertext}<br>max %{y:.3g}<extra></extra>"), row=1, col=1)
    # the status strip: each non-flow status on its own fixed baseline, never drawn as a norm of 0
    strip = [s for s in STATUS_STYLE if s != "flow"]
    causes = params.loc[status == "none", ["cause", "site"]].assign(c=codes[status == "none"])
    why = (causes.dropna(subset=["cause"]).drop_duplicates()
           .assign(w=lambda d: d["cause"].astype(object) + " at " + d["site"].astype(object).fillna("?"))
           .groupby("c")["w"].agg(lambda w: "; ".join(list(w)[:3])))
    # an invisible row of points keeps every parameter on the shared x axis when the strip is empty
    fig.add_trace(go.Scatter(x=names, y=[STATUS_STYLE[strip[0]][0]] * len(names), mode="markers",
                             marker=dict(opacity=0), showlegend=False, hoverinfo="skip"), row=2, col=1)
    for s in strip:
        counts = np.bincount(codes[status == s], minlength=k)
        idx = np.flatnonzero(counts)
        if not len(idx):
            continue
        label, colour, symbol = STATUS_STYLE[s]
        text = [f"{names[i]}<br>{label} in {counts[i]}/{total[i]} backwards"
                + (f"<br>cause: {why[i]}" if s == "none" and i in why.index else "") for i in idx]
        fig.add_trace(go.Scatter(x=names[idx], y=[label] * len(idx), mode="markers", name=label,
                                 marker=dict(color=colour, symbol=symbol, size=11, line=dict(width=2, color=colour)),
                                 hovertext=text, hovertemplate="%{hovertext}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(type="log", title_text="‖grad‖ (log)", row=1, col=1)
    if agg["count"].fillna(0).sum() == 0:
        fig.add_annotation(text="No parameter received a finite, non-zero gradient in any backward "
                                "(the strip below says what happened instead).",
                           xref="x domain", yref="y domain", x=0.5, y=0.5, showarrow=False,
                           font=dict(size=14, color="#555"))
    fig.update_yaxes(type="category", categoryorder="array", row=2, col=1, range=[-0.5, len(strip) - 0.5],
                     categoryarray=[STATUS_STYLE[s][0] for s in strip])
    fig.update_xaxes(tickangle=-50, automargin=True, row=2, col=1)
    return _layout(fig, title + " — norms over backwards with flow; other statuses in the strip below",
                   height=620, legend_top=True)


def flow_over_time(params: pd.DataFrame) -> go.Figure:
    """Heatmap parameter x step of log10 ‖grad‖ (max over the step's backwards), binned honestly."""
    title = "Gradient norm over time"
    if params.empty:
        return _note(title, "No backward was recorded: no parameter rows.")
    codes, names = pd.factorize(params["param"])
    k = len(names)
    step = params["step"].to_numpy()
    s0 = int(step.min())
    span = int(step.max()) - s0 + 1
    per = max(1, math.ceil(span / MAX_COLUMNS))
    ncol = math.ceil(span / per)
    col = (step - s0) // per
    key = codes.astype(np.int64) * ncol + col
    best = pd.Series(_flow_norms(params)).groupby(key).max().dropna()
    if best.empty:
        return _note(title, "No parameter received a finite, non-zero gradient in any step: "
                            "see the flow by parameter figure and the findings for why.")
    z = np.full(k * ncol, np.nan)
    z[best.index.to_numpy()] = np.log10(best.to_numpy())
    z = z.reshape(k, ncol)
    x = s0 + np.arange(ncol) * per
    fig = go.Figure(go.Heatmap(z=z, x=x, y=np.asarray(names, dtype=object), colorscale="Viridis",
                               colorbar=dict(title="log10 ‖grad‖"), hoverongaps=False,
                               hovertemplate="%{y}<br>step %{x}<br>log10 ‖grad‖ %{z:.2f}<extra></extra>"))
    bad = (params["status"] == "nonfinite").to_numpy(dtype=bool, na_value=False)
    if bad.any():
        cells = pd.DataFrame({"c": codes[bad], "x": x[col[bad]]}).drop_duplicates().head(MAX_POINTS)
        label, colour, symbol = STATUS_STYLE["nonfinite"]
        fig.add_trace(go.Scatter(x=cells["x"], y=np.asarray(names, dtype=object)[cells["c"]], mode="markers",
                                 name=label, marker=dict(color=colour, symbol=symbol, size=8),
                                 hovertemplate="%{y}<br>step %{x}: NaN/Inf gradient<extra></extra>"))
    binned = f"binned: {per} steps per column, max" if per > 1 else "one column per step"
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(title_text="step", dtick=per if ncol <= 20 else None)
    return _layout(fig, f"{title} (log10, max over backwards; {binned}); blank = no or zero gradient",
                   height=min(1400, max(360, 16 * k + 160)))


def _tree_nodes(sub: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray, str]:
    """ids, parents, values and branchvalues for a treemap of one backward's modules."""
    ids = ["(root)" if m == "" else m for m in sub["module"].astype(object)]
    parents = []
    for p in sub["parent"].astype(object):
        if p is None or (isinstance(p, float) and math.isnan(p)):
            parents.append("")
        else:
            parents.append("(root)" if p == "" else p)
    known = set(ids)
    parents = [p if p in known else "" for p in parents]
    values = sub["n_params"].fillna(0).to_numpy(dtype=float)
    if values.sum() == 0:
        return ids, parents, np.ones(len(ids)), "remainder"
    child_sum = pd.Series(values).groupby(pd.Series(parents)).sum()
    consistent = all(values[i] >= child_sum.get(n, 0) for i, n in enumerate(ids))
    return ids, parents, values, "total" if consistent else "remainder"


def branches(modules: pd.DataFrame, backward: pd.DataFrame) -> go.Figure:
    """Module tree of the last step, one panel per backward, coloured by status, sized by params."""
    title = "Branches: which modules received a gradient (last step, one panel per backward)"
    if modules.empty:
        return _note(title, "No module rows: no backward was recorded, or no module was observed.")
    last = modules["step"].max()
    rows = modules[modules["step"] == last]
    bws = list(pd.unique(rows["backward"]))
    shown = bws[-MAX_PANELS:]
    sites = {} if backward.empty else dict(zip(backward["backward"], backward["site"].astype(object)))
    titles = [f"backward {b} (step {last})" + (f" at {sites[b]}" if isinstance(sites.get(b), str) else "")
              for b in shown]
    fig = make_subplots(rows=len(shown), cols=1, specs=[[{"type": "domain"}]] * len(shown),
                        subplot_titles=titles, vertical_spacing=0.08 if len(shown) > 1 else 0)
    for r, b in enumerate(shown, start=1):
        sub = rows[rows["backward"] == b].sort_values("order", kind="stable") if "order" in rows else rows[rows["backward"] == b]
        ids, parents, values, mode = _tree_nodes(sub)
        status = sub["status"].astype(object).fillna("none").tolist()
        colours = [STATUS_STYLE.get(s, ("", "#cccccc", ""))[1] for s in status]
        norm = sub["grad_norm"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}").tolist()
        nparams = sub["n_params"].fillna(0).astype(int).tolist()
        custom = np.stack([[STATUS_STYLE.get(s, (s,))[0] for s in status], norm, nparams], axis=1)
        fig.add_trace(go.Treemap(ids=ids, labels=ids, parents=parents, values=values, branchvalues=mode,
                                marker=dict(colors=colours), customdata=custom, sort=False,
                                texttemplate="<b>%{label}</b><br>%{customdata[0]}", hovertemplate="<b>%{label}</b><br>%{customdata[0]}<br>‖grad‖ %{customdata[1]}"
                                              "<br>%{customdata[2]} parameters<extra></extra>"),
                      row=r, col=1)
    for s, (label, colour, _) in STATUS_STYLE.items():  # a legend for the colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label,
                                 marker=dict(color=colour, symbol="square", size=12)))
    fig.update_layout(xaxis=dict(visible=False), yaxis=dict(visible=False))
    note = f" — showing the last {MAX_PANELS} of {len(bws)} backwards" if len(bws) > len(shown) else ""
    return _layout(fig, title + note, height=120 + 320 * len(shown))


def cuts_figure(cuts: pd.DataFrame) -> go.Figure:
    """Where flow stopped, by site and kind, with the parameters each cut kept gradient from."""
    title = "Cuts: where a tensor that depended on trainable parameters left the graph"
    if cuts.empty:
        return _note(title, "No cuts: no tensor that depended on a trainable tensor left the graph.")
    d = cuts.assign(
        site=cuts["site"].astype(object).fillna("(unknown site)"),
        kind=cuts["kind"].astype(object).fillna("?"),
        effective=cuts["effective"].fillna(False).astype(bool),
        n=cuts["count"].fillna(1) if "count" in cuts else 1,
    )
    keys = ["site", "kind", "effective"]
    g = d.groupby(keys, sort=False).agg(count=("n", "sum"), steps=("step", "nunique"))
    mods = (d.dropna(subset=["module"]).groupby(keys, sort=False)["module"]
            .agg(lambda m: ", ".join(dict.fromkeys(map(str, m)))))
    up = (d[keys + ["upstream"]].explode("upstream").dropna(subset=["upstream"])
          .groupby(keys, sort=False)["upstream"].agg(lambda u: list(dict.fromkeys(u))))
    g = g.join(mods.rename("modules")).join(up.rename("upstream")).reset_index()
    g = g.sort_values(["effective", "count"], ascending=[True, True], kind="stable")
    fig = go.Figure()
    for eff, label, colour in ((True, "cut a gradient a backward needed", "#d62828"),
                               (False, "cut, but no backward would have used it", "#8d99ae")):
        part = g[g["effective"] == eff]
        if part.empty:
            continue
        hover = []
        for r in part.itertuples():
            ups = r.upstream if isinstance(r.upstream, list) else []
            shown = ", ".join(ups[:20]) + (f" and {len(ups) - 20} more" if len(ups) > 20 else "")
            hover.append(f"<b>{r.kind}</b> at {r.site}<br>module: {r.modules if isinstance(r.modules, str) else '-'}"
                         f"<br>{r.count} cuts in {r.steps} steps<br>cut off: {shown or '-'}")
        fig.add_trace(go.Bar(y=part["site"] + " · " + part["kind"], x=part["count"], orientation="h",
                             name=label, marker_color=colour, hovertext=hover,
                             hovertemplate="%{hovertext}<extra></extra>"))
    fig.update_xaxes(title_text="times cut", dtick=1 if g["count"].max() <= 10 else None)
    fig.update_yaxes(automargin=True)
    return _layout(fig, title, height=min(1200, 180 + 32 * len(g)))


def saved_memory(saved: pd.DataFrame) -> go.Figure:
    """Bytes saved for backward by kind, module and op, for the step that saved the most."""
    title = "Saved for backward"
    if saved.empty:
        return _note(title, "No saved-tensor rows: memory tracking was off or no graph was built.")
    per_step = saved.groupby("step")["nbytes"].sum()
    peak = per_step.idxmax()
    d = saved[saved["step"] == peak].assign(
        kind=lambda x: x["kind"].astype(object).fillna("?"),
        module=lambda x: x["module"].astype(object).fillna("(no module)").replace("", "(root)"),
        op=lambda x: x["op"].astype(object).fillna("?"),
        freed_by=lambda x: x["freed_by"].astype(object).fillna("?"))
    leaf = d.groupby(["kind", "module", "op"], sort=False).agg(nbytes=("nbytes", "sum"), n=("nbytes", "size"))
    freed = (d.groupby(["kind", "module", "op", "freed_by"], sort=False).size()
             .reset_index().groupby(["kind", "module", "op"], sort=False)
             .apply(lambda f: ", ".join(f"{c} {w}" for w, c in zip(f["freed_by"], f[0])), include_groups=False))
    nodes = []  # (id, label, parent, bytes, kind, text): kind -> module -> op
    for kind, kb in leaf.groupby(level="kind", sort=False)["nbytes"].sum().items():
        nodes.append((kind, kind, "", kb, kind, human_bytes(kb)))
    for (kind, mod), mb in leaf.groupby(level=["kind", "module"], sort=False)["nbytes"].sum().items():
        nodes.append((f"{kind}/{mod}", mod, kind, mb, kind, human_bytes(mb)))
    for (kind, mod, op), r in leaf.iterrows():
        text = (f"{human_bytes(r['nbytes'])} in {_plural(int(r['n']), 'tensor')}"
                f"<br>freed by: {freed.get((kind, mod, op), '?')}")
        nodes.append((f"{kind}/{mod}/{op}", op, f"{kind}/{mod}", r["nbytes"], kind, text))
    ids, labels, parents, values, kinds, info = (list(c) for c in zip(*nodes))
    colours = [KIND_COLOUR.get(k, "#cccccc") for k in kinds]
    fig = go.Figure(go.Treemap(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                               marker=dict(colors=colours), customdata=info, sort=True,
                               texttemplate="<b>%{label}</b><br>%{customdata}",
                               hovertemplate="<b>%{id}</b><br>%{customdata}<extra></extra>"))
    where = f"step {peak} (the largest of {len(per_step)} steps)" if len(per_step) > 1 else f"step {peak}"
    return _layout(fig, f"{title}: {human_bytes(per_step.max())} in {where} — by kind, module, op", height=520)


def _bin_max(df: pd.DataFrame, cols: list[str], xcol: str) -> tuple[pd.DataFrame, int]:
    """Downsample a timeline to <= MAX_POINTS rows: first x, max of each column per bin (keeps peaks)."""
    n = len(df)
    if n <= MAX_POINTS:
        return df, 1
    per = math.ceil(n / MAX_POINTS)
    b = np.arange(n) // per
    agg = {xcol: "first", **{c: "max" for c in cols}}
    return df.groupby(b).agg(agg), per


KIND_GROUPS = {  # drawn apart: what torch.no_grad() would free, and what stays allocated anyway
    "freeable (activation + cast)": (("activation", "cast"), "#457b9d", "solid"),
    "parameters + buffers": (("parameter", "buffer"), "#2a9d8f", "dot"),
    "inputs": (("input",), "#f4a261", "dot"),
}


def _live_by_group(saved: pd.DataFrame, times: np.ndarray) -> dict[str, np.ndarray]:
    """Live saved bytes of each kind group at `times`, from the saved tensors' [t_saved, t_freed)."""
    need = {"t_saved", "t_freed", "nbytes", "kind"}
    if saved.empty or not need <= set(saved.columns) or not saved["t_saved"].notna().any():
        return {}
    d = saved[saved["t_saved"].notna()]
    key = (d["storage"].astype("float64").fillna(-1 - pd.Series(np.arange(len(d)), index=d.index))
           if "storage" in d else pd.Series(np.arange(len(d)), index=d.index))
    g = pd.DataFrame({"k": key, "t0": d["t_saved"].astype(float),
                      "t1": d["t_freed"].astype(float).fillna(np.inf),
                      "nb": d["nbytes"].astype("float64").fillna(0), "kind": d["kind"].astype(object)})
    g = g.groupby("k").agg(t0=("t0", "min"), t1=("t1", "max"), nb=("nb", "sum"), kind=("kind", "first"))
    out = {}
    for label, (kinds, _, _) in KIND_GROUPS.items():
        sel = g[g["kind"].isin(kinds)]
        if sel.empty or sel["nb"].sum() == 0:
            continue
        o0, o1 = np.argsort(sel["t0"].to_numpy()), np.argsort(sel["t1"].to_numpy())
        t0, t1 = sel["t0"].to_numpy()[o0], sel["t1"].to_numpy()[o1]
        c0 = np.concatenate([[0], np.cumsum(sel["nb"].to_numpy()[o0])])
        c1 = np.concatenate([[0], np.cumsum(sel["nb"].to_numpy()[o1])])
        out[label] = c0[np.searchsorted(t0, times, "right")] - c1[np.searchsorted(t1, times, "right")]
    return out


def _with_gaps(d: pd.DataFrame) -> pd.DataFrame:
    """A NaN row after every step that is not followed by the next step: lines break where steps were not
    sampled instead of joining across them (or dropping to 0)."""
    steps = d["step"].to_numpy()
    brk = np.flatnonzero((np.diff(steps) > 1))
    if not len(brk):
        return d
    gap = pd.DataFrame({c: np.nan for c in d.columns}, index=range(len(brk)))
    gap["x"] = steps[brk] + 0.999
    gap["step"] = steps[brk]
    gap["_gap"] = True
    d = d.assign(_gap=False)
    out = pd.concat([d, gap], ignore_index=True).sort_values(["x", "_gap"], kind="stable")
    return out.drop(columns="_gap").reset_index(drop=True)


def _empty_panel(fig: go.Figure, row: int, text: str) -> None:
    """Words instead of an axis drawn around nothing (-1 B .. 1 B)."""
    axis = "y" if row == 1 else f"y{row}"
    fig.add_annotation(text=text, xref="x domain" if row == 1 else f"x{row} domain", yref=f"{axis} domain",
                       x=0.5, y=0.5, showarrow=False, font=dict(size=13, color="#555"))
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, range=[0, 1], row=row, col=1)


def memory_timeline(memory: pd.DataFrame, findings: pd.DataFrame, saved: pd.DataFrame | None = None) -> go.Figure:
    """Live saved-tensor bytes and process memory by step (events placed in order inside their step),
    backward calls marked, parameters/buffers drawn apart from freeable bytes, gaps where no step was
    sampled, and findings marked at their step."""
    title = "Memory by step"
    if memory.empty:
        return _note(title, "No memory events were recorded (memory tracking was off, or no step was sampled).")
    saved = pd.DataFrame() if saved is None else saved
    m = memory.sort_values(["step", "t"], kind="stable").reset_index(drop=True)
    rank = m.groupby("step").cumcount().to_numpy()
    n_in = m.groupby("step")["step"].transform("size").to_numpy()
    m["x"] = m["step"].to_numpy(dtype=float) + rank / np.maximum(n_in, 1)  # step s: events in [s, s+1)
    groups = _live_by_group(saved, m["t"].to_numpy(dtype=float)) if len(m) and m["t"].notna().all() else {}
    sampled = set(saved["step"].astype("int64")) if len(saved) and "step" in saved else set()
    in_sampled = m["step"].isin(sampled).to_numpy()
    for label, v in groups.items():
        m[label] = np.where(in_sampled, v, np.nan)
    saved_cols = [c for c in ("live_saved_bytes", "counterfactual_saved_bytes") if c in m and m[c].notna().any()]
    saved_cols += list(groups)
    proc_cols = [c for c in ("rss_bytes", "cuda_allocated_bytes") if c in m and m[c].notna().any()]
    cols = saved_cols + proc_cols
    num = m[["x", "step"] + cols].astype({c: "float64" for c in cols + ["x"]})
    per, binned = 1, ""
    if len(num) > MAX_POINTS:  # one point per step (its max), then whole steps per point
        n_steps = num["step"].nunique()
        per = max(1, math.ceil(n_steps / MAX_POINTS))
        key = num["step"] // per
        num = num.groupby(key).agg({"step": "first", **{c: "max" for c in cols}}).reset_index(drop=True)
        num["x"] = num["step"].astype(float)
        binned = f" (binned: max of every {per} steps)" if per > 1 else " (one point per step: its max)"
    d = _with_gaps(num)
    proc_row = 2
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=["saved for backward (live)", "process memory"])
    style = {"live_saved_bytes": ("live saved tensors", "#222222", "solid"),
             "counterfactual_saved_bytes": ("had each graph been freed at its first backward", "#e76f51", "dash"),
             "rss_bytes": ("process RSS", "#6c757d", "solid"),
             "cuda_allocated_bytes": ("CUDA allocated", "#e76f51", "solid"),
             **{k: (k, c, dash) for k, (_, c, dash) in KIND_GROUPS.items()}}
    for c in cols:
        label, colour, dash = style[c]
        # RSS is read at step ends only: its own points joined, broken only at the gap rows
        gap = d[cols].isna().all(axis=1)
        sparse = d[c].notna().sum() < 0.5 * (~gap).sum()
        sub = d[d[c].notna() | gap] if sparse else d
        fig.add_trace(go.Scatter(x=sub["x"], y=sub[c], mode="lines+markers" if sparse else "lines",
                                 name=label, line=dict(color=colour, dash=dash, width=2 if c == "live_saved_bytes" else 1.5),
                                 connectgaps=False, customdata=np.floor(sub["x"]),
                                 hovertemplate="step %{customdata:.0f}<br>%{y:.4s}B<extra>" + label + "</extra>"),
                      row=1 if c in saved_cols else proc_row, col=1)
    if per == 1 and "event" in m and "live_saved_bytes" in m:  # backward calls, on the saved line
        bw = m[m["event"].astype(object) == "backward_begin"]
        if len(bw):
            text = [f"backward {'' if pd.isna(b) else int(b)} in step {s}" + (f"<br>at {st}" if isinstance(st, str) else "")
                    for b, s, st in zip(bw["backward"] if "backward" in bw else [pd.NA] * len(bw), bw["step"],
                                        bw["site"].astype(object) if "site" in bw else [None] * len(bw))]
            fig.add_trace(go.Scatter(x=bw["x"], y=bw["live_saved_bytes"].astype("float64"), mode="markers",
                                     name="backward call", marker=dict(symbol="triangle-down", size=9, color="#d62828"),
                                     hovertext=text, hovertemplate="%{hovertext}<br>%{y:.4s}B saved<extra></extra>"),
                          row=1, col=1)
    top_saved = float(np.nanmax(d[saved_cols].to_numpy())) if saved_cols and d[saved_cols].notna().any().any() else 0.0
    marked = ""
    if not findings.empty and findings["step"].notna().any() and top_saved > 0:
        f = findings.dropna(subset=["step"])
        xs = f["step"].astype("int64").to_numpy(dtype=float)
        marked = "; dotted lines: steps with findings"
        for s in list(dict.fromkeys(xs))[:30]:
            fig.add_vline(x=s, line=dict(color="#999", width=1, dash="dot"), row="all", col=1)
        for sev, (colour, symbol) in SEVERITY_STYLE.items():
            sel = (f["severity"] == sev).to_numpy(dtype=bool, na_value=False)
            if sel.any():
                text = [f"step {int(s)}: {k}<br>{msg}" for s, k, msg in
                        zip(f["step"][sel], f["kind"][sel], f["message"].astype(object)[sel])]
                fig.add_trace(go.Scatter(x=xs[sel], y=[top_saved * 1.05] * int(sel.sum()), mode="markers",
                                         name=f"{sev} finding", marker=dict(color=colour, symbol=symbol, size=11),
                                         hovertext=text, hovertemplate="%{hovertext}<extra></extra>"), row=1, col=1)
    # honest scales: bytes from 0, so a 1 MB wiggle on 460 MB is not drawn as a climb; SI ticks, distinct
    fig.update_yaxes(tickformat=".3~s", ticksuffix="B", rangemode="tozero")
    if top_saved <= 0:
        _empty_panel(fig, 1, "No tensor was saved for backward in the sampled steps.")
    if not proc_cols:
        _empty_panel(fig, proc_row, "Process memory (RSS, CUDA) was not read in this run.")
    lo, hi = float(np.nanmin(d["x"])), float(np.nanmax(d["x"]))
    fig.update_xaxes(range=[math.floor(lo) - 0.2, math.floor(hi) + 1.1])
    fig.update_xaxes(title_text="step (events in order within each step; gaps: steps not sampled)",
                     dtick=1 if hi - lo <= 25 else None, tickformat="d", row=proc_row, col=1)
    bwm = "; ▼ backward calls" if any(t.name == "backward call" for t in fig.data) else ""
    return _layout(fig, title + binned + bwm + marked, height=700)


def no_grad_retain(backward: pd.DataFrame, findings: pd.DataFrame) -> go.Figure:
    """Bytes held after backward by retain_graph=True, and graphs no backward used (no_grad would save)."""
    title = "Memory that retain_graph kept and that torch.no_grad() would have saved"
    ret = pd.DataFrame()
    if not backward.empty:
        ret = backward[backward["retained_bytes"].fillna(0) > 0]
    unused = pd.DataFrame()
    if not findings.empty:
        unused = findings[(findings["kind"] == "unused_graph").to_numpy(dtype=bool, na_value=False)]
    if ret.empty and unused.empty:
        return _note(title, "No graph was kept after its backward by retain_graph=True, "
                            "and no forward built a graph that no backward used.")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=["held after backward (retain_graph=True)",
                                        "unused graphs: what torch.no_grad() would have saved"])
    note = ""
    if not ret.empty:
        r = ret[["backward", "step", "retained_bytes"]].astype({"retained_bytes": "float64"})
        if len(r) > 300:
            per = math.ceil(len(r) / 300)
            r = r.groupby(np.arange(len(r)) // per).agg(backward="first", step="first", retained_bytes="max")
            note = f" (binned: max of every {per} backwards)"
        labels = [f"b{b} (step {s})" for b, s in zip(r["backward"], r["step"])]
        fig.add_trace(go.Bar(x=labels, y=r["retained_bytes"], name="retained by retain_graph", marker_color="#e76f51",
                             hovertext=[human_bytes(v) for v in r["retained_bytes"]],
                             hovertemplate="%{x}: %{hovertext}<extra></extra>"), row=1, col=1)
    if not unused.empty:
        u = unused.assign(site=unused["site"].astype(object).fillna("(unknown site)"),
                          nb=unused["nbytes"].astype("float64"))
        g = u.groupby("site", sort=False).agg(nbytes=("nb", "sum"), n=("nb", "size"),
                                              peak=("nb", "max")).reset_index()
        fig.add_trace(go.Bar(x=g["site"], y=g["nbytes"], name="unused graph (add torch.no_grad())",
                             marker_color="#2a9d8f",
                             hovertext=[f"{n} unused graphs, {human_bytes(b)} in total, largest {human_bytes(p)}"
                                        for n, b, p in zip(g["n"], g["nbytes"], g["peak"])],
                             hovertemplate="%{x}: %{hovertext}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(tickformat=".3~s", ticksuffix="B", rangemode="tozero")
    if ret.empty:  # words, not an axis from -1 B to 1 B
        fig.add_annotation(text="No backward kept its graph with retain_graph=True.", xref="x domain",
                           yref="y domain", x=0.5, y=0.5, showarrow=False, font=dict(size=13, color="#555"))
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, range=[0, 1], row=1, col=1)
        fig.update_xaxes(visible=False, row=1, col=1)
    if unused.empty:
        fig.add_annotation(text="Every forward's graph was used by a backward.", xref="x2 domain",
                           yref="y2 domain", x=0.5, y=0.5, showarrow=False, font=dict(size=13, color="#555"))
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, range=[0, 1], row=1, col=2)
        fig.update_xaxes(visible=False, row=1, col=2)
    return _layout(fig, title + note, height=440)
