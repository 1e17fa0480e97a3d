"""Gradient flow by parameter. Reads tables params; never findings."""

from __future__ import annotations


import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import STATUS_STYLE, flow_norms, layout, empty_figure

NAME = 'flow_by_layer'
TABLES = ('params',)  # what draw() is given, in this order


def draw(params: pd.DataFrame) -> go.Figure:
    """Mean and max gradient norm per parameter in forward order, with no/zero/NaN/frozen marked."""
    title = "Gradient flow by parameter (forward order)"
    if params.empty:
        return empty_figure(title, "No backward was recorded: no parameter rows.")
    codes, names = pd.factorize(params["param"])  # order of first appearance = forward order
    names = np.asarray(names, dtype=object)
    k = len(names)
    norms = pd.Series(flow_norms(params))
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
    fig.update_yaxes(type="log", dtick="D2", title_text="‖grad‖ (log)", row=1, col=1)  # 1, 2, 5 per decade: no clutter
    if agg["count"].fillna(0).sum() == 0:
        fig.add_annotation(text="No parameter received a finite, non-zero gradient in any backward "
                                "(the strip below says what happened instead).",
                           xref="x domain", yref="y domain", x=0.5, y=0.5, showarrow=False,
                           font=dict(size=14, color="#555"))
    fig.update_yaxes(type="category", categoryorder="array", row=2, col=1, range=[-0.5, len(strip) - 0.5],
                     categoryarray=[STATUS_STYLE[s][0] for s in strip])
    fig.update_xaxes(tickangle=-50, automargin=True, row=2, col=1)
    return layout(fig, title + " — norms over backwards with flow; other statuses in the strip below",
                   height=620, legend_top=True)
