"""Gradient flow over steps. Reads tables params; never findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import MAX_COLUMNS, MAX_POINTS, STATUS_STYLE, flow_norms, layout, empty_figure

NAME = 'flow_over_time'
TABLES = ('params',)  # what draw() is given, in this order


def draw(params: pd.DataFrame) -> go.Figure:
    """Heatmap parameter x step of log10 ‖grad‖ (max over the step's backwards), binned honestly."""
    title = "Gradient norm over time"
    if params.empty:
        return empty_figure(title, "No backward was recorded: no parameter rows.")
    codes, names = pd.factorize(params["param"])
    k = len(names)
    step = params["step"].to_numpy()
    s0 = int(step.min())
    span = int(step.max()) - s0 + 1
    per = max(1, math.ceil(span / MAX_COLUMNS))
    ncol = math.ceil(span / per)
    col = (step - s0) // per
    key = codes.astype(np.int64) * ncol + col
    best = pd.Series(flow_norms(params)).groupby(key).max().dropna()
    if best.empty:
        return empty_figure(title, "No parameter received a finite, non-zero gradient in any step: "
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
    return layout(fig, f"{title} (log10, max over backwards; {binned}); blank = no or zero gradient",
                   height=min(1400, max(360, 16 * k + 160)))
