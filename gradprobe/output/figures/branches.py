"""Which branches got gradient (treemap per backward). Reads tables modules, backward; never findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import MAX_PANELS, STATUS_STYLE, layout, empty_figure

NAME = 'branches'
TABLES = ('modules', 'backward')  # what draw() is given, in this order


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


def _labels(sub: pd.DataFrame) -> list[str]:
    """Tile names: the last part of the module's name with its type (`fc1 (Linear)`); a Sequential or
    ModuleList child keeps its container's name (`layers.0 (Linear)`, `layers.1.0 (Linear)`); the root is its type."""
    types = sub["type"].astype(object).tolist() if "type" in sub else [None] * len(sub)
    out = []
    for name, kind in zip(sub["module"].astype(object), types):
        kind = kind if isinstance(kind, str) and kind else None
        if not isinstance(name, str) or name == "":
            out.append(kind or "(root)")
            continue
        parts = name.split(".")
        k = len(parts) - 1
        while k > 0 and parts[k].isdigit():  # indices of containers: back to the container's own name
            k -= 1
        short = ".".join(parts[k:])
        out.append(f"{short} ({kind})" if kind else short)
    return out


def draw(modules: pd.DataFrame, backward: pd.DataFrame) -> go.Figure:
    """Module tree of the last step, one panel per backward, coloured by status, sized by params."""
    title = "Branches: which modules received a gradient (last step, one panel per backward)"
    if modules.empty:
        return empty_figure(title, "No module rows: no backward was recorded, or no module was observed.")
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
        fig.add_trace(go.Treemap(ids=ids, labels=_labels(sub), parents=parents, values=values, branchvalues=mode,
                                marker=dict(colors=colours), customdata=custom, sort=False,
                                texttemplate="<b>%{label}</b><br>%{customdata[0]}",
                                hovertemplate="<b>%{label}</b><br>%{id}<br>%{customdata[0]}<br>‖grad‖ %{customdata[1]}"
                                              "<br>%{customdata[2]} parameters<extra></extra>"),
                      row=r, col=1)
    for s, (label, colour, _) in STATUS_STYLE.items():  # a legend for the colours
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label,
                                 marker=dict(color=colour, symbol="square", size=12)))
    fig.update_layout(xaxis=dict(visible=False), yaxis=dict(visible=False))
    note = f" — showing the last {MAX_PANELS} of {len(bws)} backwards" if len(bws) > len(shown) else ""
    return layout(fig, title + note, height=120 + 320 * len(shown))
