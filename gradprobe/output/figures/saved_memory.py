"""Saved for backward, by kind, module and op. Reads tables saved; never findings."""

from __future__ import annotations


import pandas as pd
import plotly.graph_objects as go

from ...text import human_bytes
from .style import KIND_COLOUR, layout, empty_figure, plural

NAME = 'saved_memory'
TABLES = ('saved',)  # what draw() is given, in this order


def draw(saved: pd.DataFrame) -> go.Figure:
    """Bytes saved for backward by kind, module and op, for the step that saved the most."""
    title = "Saved for backward"
    if saved.empty:
        return empty_figure(title, "No saved-tensor rows: memory tracking was off or no graph was built.")
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
        text = (f"{human_bytes(r['nbytes'])} in {plural(int(r['n']), 'tensor')}"
                f"<br>freed by: {freed.get((kind, mod, op), '?')}")
        nodes.append((f"{kind}/{mod}/{op}", op, f"{kind}/{mod}", r["nbytes"], kind, text))
    ids, labels, parents, values, kinds, info = (list(c) for c in zip(*nodes))
    colours = [KIND_COLOUR.get(k, "#cccccc") for k in kinds]
    fig = go.Figure(go.Treemap(ids=ids, labels=labels, parents=parents, values=values, branchvalues="total",
                               marker=dict(colors=colours), customdata=info, sort=True,
                               texttemplate="<b>%{label}</b><br>%{customdata}",
                               hovertemplate="<b>%{id}</b><br>%{customdata}<extra></extra>"))
    where = f"step {peak} (the largest of {len(per_step)} steps)" if len(per_step) > 1 else f"step {peak}"
    return layout(fig, f"{title}: {human_bytes(per_step.max())} in {where} — by kind, module, op", height=520)
