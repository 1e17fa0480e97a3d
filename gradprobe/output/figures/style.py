"""What every figure shares: colours, limits, the common layout, and a figure that says why it is empty."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

STATUS_STYLE = {
    "flow": ("gradient flowed", "#2a9d8f", "circle"),
    "zero": ("exactly zero", "#f4a261", "circle-open"),
    "nonfinite": ("NaN / Inf", "#d62828", "diamond"),
    "none": ("no gradient", "#7b2cbf", "x"),
    "frozen": ("frozen (requires_grad=False)", "#8d99ae", "square-open"),
}

KIND_COLOUR = {"activation": "#457b9d", "cast": "#6a8fb3", "parameter": "#2a9d8f", "buffer": "#8ab17d",
               "input": "#f4a261"}

MAX_COLUMNS = 500  # heatmap columns (steps) before binning

MAX_POINTS = 2000  # points per timeline trace before binning

MAX_PANELS = 4  # backward panels in the branches figure

TEMPLATE = "plotly_white"


def empty_figure(title: str, text: str) -> go.Figure:
    """A figure with no data that says why: an empty table must not look like a bug."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#555"))
    fig.update_layout(title=title, template=TEMPLATE, height=220,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def layout(fig: go.Figure, title: str, height: int, legend_top: bool = False) -> go.Figure:
    """Common look; the legend goes on top only where no subplot titles could collide with it."""
    legend = (dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1) if legend_top
              else dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01))
    fig.update_layout(title=dict(text=title, x=0.01), template=TEMPLATE, height=height,
                      margin=dict(l=60, r=30, t=80, b=60), legend=legend)
    return fig


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def flow_norms(params: pd.DataFrame) -> np.ndarray:
    """grad_norm where a finite, non-zero gradient arrived; NaN elsewhere (never 0)."""
    norm = params["grad_norm"].to_numpy(dtype=float, na_value=np.nan)
    ok = (params["status"] == "flow").to_numpy(dtype=bool, na_value=False) & np.isfinite(norm) & (norm > 0)
    return np.where(ok, norm, np.nan)


def bin_max(df: pd.DataFrame, cols: list[str], xcol: str) -> tuple[pd.DataFrame, int]:
    """Downsample a timeline to <= MAX_POINTS rows: first x, max of each column per bin (keeps peaks)."""
    n = len(df)
    if n <= MAX_POINTS:
        return df, 1
    per = math.ceil(n / MAX_POINTS)
    b = np.arange(n) // per
    agg = {xcol: "first", **{c: "max" for c in cols}}
    return df.groupby(b).agg(agg), per


def empty_panel(fig: go.Figure, row: int, text: str) -> None:
    """Words instead of an axis drawn around nothing (-1 B .. 1 B)."""
    axis = "y" if row == 1 else f"y{row}"
    fig.add_annotation(text=text, xref="x domain" if row == 1 else f"x{row} domain", yref=f"{axis} domain",
                       x=0.5, y=0.5, showarrow=False, font=dict(size=13, color="#555"))
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, range=[0, 1], row=row, col=1)
