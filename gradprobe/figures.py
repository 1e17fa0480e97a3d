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
KIND_COLOUR = {"activation": "#457b9d", "parameter": "#2a9d8f", "input": "#f4a261"}
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
        "memory_timeline": memory_timeline(get("memory"), get("findings")),
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


def memory_timeline(memory: pd.DataFrame, findings: pd.DataFrame) -> go.Figure:
    """Live saved-tensor bytes and process memory over time, with findings marked at their step."""
    title = "Memory over time"
    if memory.empty:
        return _note(title, "No memory events were recorded.")
    m = memory.sort_values("t", kind="stable").reset_index(drop=True)
    t = m["t"].astype(float)
    m = m.assign(x=(t - t.min()) if t.notna().any() else np.arange(len(m), dtype=float))
    saved_cols = [c for c in ("live_saved_bytes", "counterfactual_saved_bytes") if c in m and m[c].notna().any()]
    proc_cols = [c for c in ("rss_bytes", "cuda_allocated_bytes") if c in m and m[c].notna().any()]
    cols = saved_cols + proc_cols
    num = m[["x", "step"] + cols].astype({c: "float64" for c in cols})
    d, per = _bin_max(num, cols, "x")
    rows = 2 if proc_cols else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=["saved for backward"] + (["process memory"] if proc_cols else []))
    style = {"live_saved_bytes": ("live saved tensors", "#457b9d", "solid"),
             "counterfactual_saved_bytes": ("had each graph been freed at its first backward", "#2a9d8f", "dash"),
             "rss_bytes": ("process RSS", "#6c757d", "solid"),
             "cuda_allocated_bytes": ("CUDA allocated", "#e76f51", "solid")}
    for c in cols:
        label, colour, dash = style[c]
        has = d[c].notna()  # RSS is read at step ends only: join its points, not the gaps between them
        fig.add_trace(go.Scatter(x=d.loc[has, "x"], y=d.loc[has, c], mode="lines" if has.all() else "lines+markers",
                                 name=label, line=dict(color=colour, dash=dash),
                                 hovertemplate="t=%{x:.3f}s<br>%{y:.4s}B<extra>" + label + "</extra>"),
                      row=1 if c in saved_cols else 2, col=1)
    if not findings.empty and findings["step"].notna().any():
        first_t = num.groupby("step")["x"].min()
        f = findings.dropna(subset=["step"])
        f = f[f["step"].astype("int64").isin(first_t.index)]
        if len(f):
            xs = first_t.loc[f["step"].astype("int64")].to_numpy()
            top = float(np.nanmax(d[saved_cols].to_numpy())) if saved_cols else 1.0
            for s in list(dict.fromkeys(xs))[:30]:
                fig.add_vline(x=s, line=dict(color="#999", width=1, dash="dot"), row="all", col=1)
            for sev, (colour, symbol) in SEVERITY_STYLE.items():
                sel = (f["severity"] == sev).to_numpy(dtype=bool, na_value=False)
                if sel.any():
                    text = [f"step {int(s)}: {k}<br>{msg}" for s, k, msg in
                            zip(f["step"][sel], f["kind"][sel], f["message"].astype(object)[sel])]
                    fig.add_trace(go.Scatter(x=xs[sel], y=[top * 1.05] * int(sel.sum()), mode="markers",
                                             name=f"{sev} finding", marker=dict(color=colour, symbol=symbol, size=11),
                                             hovertext=text, hovertemplate="%{hovertext}<extra></extra>"), row=1, col=1)
    fig.update_yaxes(tickformat=".4~s", ticksuffix="B")
    fig.update_xaxes(title_text="seconds since first event", row=rows, col=1)
    binned = f" (binned: max of every {per} events)" if per > 1 else ""
    return _layout(fig, title + binned + "; dotted lines: steps with findings", height=340 + 220 * rows)


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
    fig.update_yaxes(tickformat=".4~s", ticksuffix="B")
    return _layout(fig, title + note, height=440)
