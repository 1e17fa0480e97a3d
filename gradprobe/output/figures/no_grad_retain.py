"""Memory that retain_graph kept and no_grad would have saved. Reads tables backward, saved; never findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...tables.graphs import unused_graphs
from ...text import human_bytes
from .style import layout, empty_figure

NAME = 'no_grad_retain'
TABLES = ('backward', 'saved')  # what draw() is given, in this order


def draw(backward: pd.DataFrame, saved: pd.DataFrame) -> go.Figure:
    """Bytes held after backward by retain_graph=True, and graphs no backward used (no_grad would save)."""
    title = "Memory that retain_graph kept and that torch.no_grad() would have saved"
    ret = pd.DataFrame()
    if not backward.empty:
        ret = backward[backward["retained_bytes"].fillna(0) > 0]
    unused = unused_graphs({"saved": saved}).rename(columns={"act": "nbytes"})
    if ret.empty and unused.empty:
        return empty_figure(title, "No graph was kept after its backward by retain_graph=True, "
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
        fig.add_trace(go.Bar(x=g["site"], y=g["nbytes"], name="forward graph no backward used",
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
    return layout(fig, title + note, height=440)
