"""Memory by step. Reads tables memory, saved; never findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...text import human_bytes
from .style import MAX_POINTS, empty_panel, layout, empty_figure

NAME = 'memory_timeline'
TABLES = ('memory', 'saved')  # what draw() is given, in this order


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


def draw(memory: pd.DataFrame, saved: pd.DataFrame | None = None) -> go.Figure:
    """Live saved-tensor bytes and process memory by step (events placed in order inside their step),
    backward calls marked, parameters/buffers drawn apart from freeable bytes, gaps where no step was
    sampled, and steps that ended with graphs of earlier steps still alive (leaks) marked."""
    title = "Memory by step"
    if memory.empty:
        return empty_figure(title, "No memory events were recorded (memory tracking was off, or no step was sampled).")
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
    if "leaked_graphs" in m and top_saved > 0:  # steps that ended with graphs of earlier steps still alive
        ends = m[(m["event"].astype(object) == "step_end") & (m["leaked_graphs"].fillna(0) > 0)]
        if len(ends):
            marked = "; ◆ steps ending with graphs of earlier steps alive"
            text = [f"end of step {int(s)}: {int(g)} graph(s) of earlier steps alive, {human_bytes(b)}"
                    for s, g, b in zip(ends["step"], ends["leaked_graphs"], ends["leaked_bytes"].fillna(0))]
            fig.add_trace(go.Scatter(x=ends["step"].astype(float) + 0.999, y=[top_saved * 1.05] * len(ends),
                                     mode="markers", name="graphs of earlier steps alive",
                                     marker=dict(color="#d62828", symbol="diamond", size=9),
                                     hovertext=text, hovertemplate="%{hovertext}<extra></extra>"), row=1, col=1)
    # honest scales: bytes from 0, so a 1 MB wiggle on 460 MB is not drawn as a climb; SI ticks, distinct
    fig.update_yaxes(tickformat=".3~s", ticksuffix="B", rangemode="tozero")
    if top_saved <= 0:
        empty_panel(fig, 1, "No tensor was saved for backward in the sampled steps.")
    if not proc_cols:
        empty_panel(fig, proc_row, "Process memory (RSS, CUDA) was not read in this run.")
    lo, hi = float(np.nanmin(d["x"])), float(np.nanmax(d["x"]))
    fig.update_xaxes(range=[math.floor(lo) - 0.2, math.floor(hi) + 1.1])
    fig.update_xaxes(title_text="step (events in order within each step; gaps: steps not sampled)",
                     dtick=1 if hi - lo <= 25 else None, tickformat="d", row=proc_row, col=1)
    bwm = "; ▼ backward calls" if any(t.name == "backward call" for t in fig.data) else ""
    return layout(fig, title + binned + bwm + marked, height=700)
