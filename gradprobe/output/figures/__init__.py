"""Plotly figures built from the run tables (see tables/schema.py). Pure pandas/plotly: never torch.

One file per figure; each declares NAME and the TABLES its draw() reads (never the findings). Every
figure aggregates with pandas/numpy first, so a 10,000-step run still plots a few thousand points,
and says in its title when it binned. An empty table gives a figure that explains why it is empty.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ..merge import merged_ranks
from . import branches, cuts, flow_by_layer, flow_over_time, memory_timeline, no_grad_retain, saved_memory

FIGURES = (flow_by_layer, flow_over_time, branches, cuts, saved_memory, memory_timeline, no_grad_retain)  # reading order


def make_figures(tables: dict[str, pd.DataFrame], meta: dict | None = None) -> dict[str, go.Figure]:
    """All report figures, keyed by name, in reading order."""
    empty = pd.DataFrame()
    ranks = merged_ranks(meta, tables.get("backward"))
    if len(ranks) > 1:  # a merged run: per-step and per-backward pictures of one rank, never two mixed
        first = ranks[0]
        tables = {k: v[v["rank"] == first] if "rank" in v else v for k, v in tables.items()}
    figs = {fig.NAME: fig.draw(*(tables.get(name, empty) for name in fig.TABLES)) for fig in FIGURES}
    if len(ranks) > 1:
        for f in figs.values():
            f.update_layout(title_text=f"{f.layout.title.text or ''} — rank {ranks[0]} of ranks "
                                       f"{', '.join(map(str, ranks))} (the tables hold every rank)")
    return figs

