"""Where gradient flow was cut. Reads tables cuts, params; never findings."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .style import layout, empty_figure

NAME = 'cuts'
TABLES = ('cuts', 'params')  # what draw() is given, in this order


def draw(cuts: pd.DataFrame, params: pd.DataFrame | None = None) -> go.Figure:
    """Where flow stopped, by site and kind, with the parameters each cut kept gradient from."""
    title = "Cuts: where a tensor that depended on trainable parameters left the graph"
    if cuts.empty:
        return empty_figure(title, "No cuts: no tensor that depended on a trainable tensor left the graph.")
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
    # a cut whose parameters all got gradients from another backward (a GAN's discriminator step) is deliberate
    trained = set() if params is None or params.empty else set(
        params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    g["group"] = [("deliberate" if isinstance(u, list) and u and all(x in trained for x in u) else "needed")
                  if e else "unused" for e, u in zip(g["effective"], g["upstream"])]
    g = g.sort_values(["effective", "count"], ascending=[True, True], kind="stable")
    fig = go.Figure()
    for group, label, colour in (("needed", "cut a gradient a backward needed", "#d62828"),
                                 ("deliberate", "cut in one backward, trained by another (as in a GAN)", "#457b9d"),
                                 ("unused", "cut, but no backward would have used it", "#8d99ae")):
        part = g[g["group"] == group]
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
    return layout(fig, title, height=min(1200, 180 + 32 * len(g)))
