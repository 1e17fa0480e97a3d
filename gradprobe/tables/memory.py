"""The memory tables from the collector's SavedLog, in vectorised passes (never touches torch).

- `saved`: one row per saved tensor of a sampled step.
- `memory`: the collector's events with the live saved bytes (all kinds, activations only, and had each
  graph been freed at its first backward) and exact peaks between events.
- `backward` and `modules` get `saved_bytes` (NA where the step was not sampled: not measured is not 0);
  retained graphs get who reused them, when they went, and the peak they cost.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .schema import FREED_BY, TABLES, frame

FREED = np.array(FREED_BY, dtype=object)
RETAIN_BUDGET = 50  # retaining backwards whose peak saving is computed (each is O(rows))


def fill(lg, tables: dict, now=None) -> None:
    n = len(lg)
    ix = {c: np.frombuffer(getattr(lg, c), dtype=np.int64) if n else np.zeros(0, np.int64)
          for c in ("step", "storage", "nbytes", "view", "graph", "version", "first_bw", "last_bw", "free_step")}
    t_saved = np.frombuffer(lg.t, dtype=np.float64) if n else np.zeros(0)
    t_freed = np.frombuffer(lg.t_freed, dtype=np.float64) if n else np.zeros(0)
    freed = np.frombuffer(lg.freed, dtype=np.int8) if n else np.zeros(0, np.int8)
    ns = len(lg.s_nbytes)
    s_nbytes = np.frombuffer(lg.s_nbytes, dtype=np.int64) if ns else np.zeros(0, np.int64)
    s_kind = np.array(lg.s_kind, dtype=object)
    s_kind[s_kind == "input?"] = "input"
    bw_end = {b: info["t_end"] for b, info in lg.bw.items()}

    sid = ix["storage"]
    device = np.array(lg.device, dtype=object)
    cuda = np.array([isinstance(d, str) and d.startswith("cuda") for d in device], dtype=bool)
    site_of = np.array([g.site for g in lg.graphs], dtype=object)
    saved = {
        "step": ix["step"], "module": lg.module, "op": lg.op, "nbytes": ix["nbytes"],
        "kind": s_kind[sid] if n else [], "freed_by": FREED[freed] if n else [], "func": lg.func,
        "param": np.array(lg.s_param, dtype=object)[sid] if n else [], "shape": lg.shape, "dtype": lg.dtype,
        "device": device, "storage": sid, "storage_bytes": s_nbytes[sid] if n else [], "view_bytes": ix["view"],
        "alloc_bytes": _masked(-(-ix["nbytes"] // 512) * 512, cuda),
        "graph": ix["graph"], "site": site_of[ix["graph"]] if n else [], "t_saved": t_saved, "t_freed": t_freed,
        "backward": _na(ix["first_bw"]), "last_backward": _na(ix["last_bw"]),
    }
    saved.update(_inplace(lg, ix, bw_end))
    tables["saved"] = frame("saved", saved)

    # storage intervals, and the counterfactual: each graph freed at its first backward
    t0 = np.frombuffer(lg.s_t0, dtype=np.float64) if ns else np.zeros(0)
    t1 = np.frombuffer(lg.s_t1, dtype=np.float64) if ns else np.zeros(0)
    tl = Timeline(t0, t1, s_nbytes)
    act = s_kind == "activation"
    tl_act = Timeline(t0[act], t1[act], s_nbytes[act])
    first_end = np.array([bw_end.get(b, math.inf) for b in ix["first_bw"].tolist()], dtype=np.float64)
    ends = np.fmin(np.where(np.isnan(t_freed), math.inf, t_freed), first_end)
    tl_cf = Timeline(*union(sid, t_saved, ends, s_nbytes))

    events = list(lg.events)
    if now is not None:
        events.append({"t": now[0], "step": now[1], "event": "now"})
    times = np.array([r["t"] for r in events], dtype=float)
    live, peak = tl.at(times)
    live_cf, peak_cf = tl_cf.at(times)
    live_act, _ = tl_act.at(times)
    names = ("live_saved_bytes", "peak_saved_bytes", "counterfactual_saved_bytes", "peak_counterfactual_bytes",
             "live_activation_bytes")
    rows = [dict(r, **dict(zip(names, v))) for r, *v in zip(events, live.tolist(), peak.tolist(), live_cf.tolist(),
                                                           peak_cf.tolist(), live_act.tolist())]
    mem = frame("memory", rows)
    tables["memory"] = mem

    bwt = tables.get("backward")
    if bwt is not None and len(bwt):
        _backward(lg, bwt, ix, t_freed, freed, s_nbytes, sid, t_saved, tl, bw_end)
    mods = tables.get("modules")
    if mods is not None and len(mods):
        _modules(lg, mods, sid, s_nbytes)


def _masked(values, keep):
    """Int64 values, NA where not `keep`."""
    out = pd.array(np.asarray(values, dtype=np.int64), dtype="Int64")
    out[~np.asarray(keep, dtype=bool)] = pd.NA
    return out


def _na(a):
    return _masked(a, a >= 0)


def _inplace(lg, ix, bw_end) -> dict:
    n = len(lg)
    where, kind, after = [None] * n, [None] * n, [None] * n
    for i, (w, k, t) in lg.inplace.items():
        where[i], kind[i] = w, k
        for b in (int(ix["first_bw"][i]), int(ix["last_bw"][i])):
            if b >= 0 and bw_end.get(b, -math.inf) > t:
                after[i] = b
                break
    return {"inplace_site": where, "inplace_kind": kind, "inplace_backward": pd.array(after, dtype="Int64")}


def union(key, start, end, nbytes_of_key):
    """Per key, the union of its [start, end) intervals -> (t0, t1, nbytes) of the merged segments."""
    if len(key) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
    df = pd.DataFrame({"k": key, "a": start, "b": end}).sort_values(["k", "a"], kind="stable")
    run = df.groupby("k", sort=False)["b"].cummax()
    prev = run.groupby(df["k"], sort=False).shift()
    seg = (prev.isna() | (df["a"] > prev)).cumsum()
    out = df.groupby(seg.values, sort=False).agg(k=("k", "first"), a=("a", "first"), b=("b", "max"))
    return out["a"].to_numpy(), out["b"].to_numpy(), nbytes_of_key[out["k"].to_numpy()]


class Timeline:
    """Sum of bytes of intervals [t0, t1) as a step function; exact values and peaks between times."""

    def __init__(self, t0, t1, nb):
        ts = np.concatenate([t0, t1])
        ds = np.concatenate([nb, -nb]).astype(np.int64)
        order = np.lexsort((ds, ts))  # at equal times releases first
        self.ts = ts[order]
        self.vals = np.concatenate([[0], np.cumsum(ds[order])]).astype(np.int64)

    def peak(self) -> int:
        return int(self.vals.max())

    def peak_in(self, a: float, b: float) -> int:
        """Largest value over [a, b]."""
        i = np.searchsorted(self.ts, a, side="right")
        j = np.searchsorted(self.ts, b, side="right")
        return int(self.vals[i:j + 1].max())

    def at(self, times):
        """Values at each time, and the peak over (previous time, time]."""
        pos = np.searchsorted(self.ts, times, side="right")
        now = self.vals[pos]
        if not len(times):
            return now, now
        # the peak over vals[previous pos .. pos] for each time, in one reduceat
        starts = np.concatenate([[0], pos[:-1]])
        ext = np.append(self.vals, np.iinfo(np.int64).min)
        idx = np.empty(2 * len(pos), dtype=np.int64)
        idx[0::2], idx[1::2] = starts, pos + 1
        return now, np.maximum.reduceat(ext, idx)[0::2]


def _backward(lg, bwt, ix, t_freed, freed, s_nbytes, sid, t_saved, tl, bw_end) -> None:
    cols = {c: [] for c in ("saved_bytes", "retained_bytes", "reused_by", "retained_until", "released_by",
                            "retain_saving_bytes", "retain_peak_saving_bytes")}
    budget = RETAIN_BUDGET
    for b in bwt["backward"].tolist():
        info = lg.bw.get(b)
        vals = dict.fromkeys(cols)
        if info is not None:
            vals["saved_bytes"], vals["retained_bytes"] = info["saved"], info["retained"]
            if info["retain"] and info["retained"]:
                vals.update(_retain(lg, b, info, ix, t_freed, freed, s_nbytes, sid, t_saved, tl, budget > 0))
                budget -= 1
        for c in cols:
            cols[c].append(vals[c])
    for c, v in cols.items():
        spec = TABLES["backward"][c]
        bwt[c] = pd.Series(v, dtype="float64" if spec == "float64" else spec).values


def _retain(lg, b, info, ix, t_freed, freed, s_nbytes, sid, t_saved, tl, peak) -> dict:
    """A backward with retain_graph=True: who reused the graph, when it went, the peak it cost."""
    end = info["t_end"]
    rows = np.frombuffer(lg.used.get(b, b""), dtype=np.int64) if b in lg.used else np.zeros(0, np.int64)
    tf = t_freed[rows]
    kept = rows[np.isnan(tf) | (tf > end)]
    out = {}
    later = [c for c in lg.used if c > b and len(kept) and np.isin(np.frombuffer(lg.used[c], dtype=np.int64),
                                                                      kept).any()]
    out["reused_by"] = min(later) if later else None
    if not len(kept):
        return out
    tk = t_freed[kept]
    if np.isnan(tk).any():
        out["retained_until"], out["released_by"] = math.nan, "alive"
    else:
        last = kept[int(np.argmax(tk))]
        out["retained_until"] = float(t_freed[last])
        out["released_by"] = (f"backward {int(ix['last_bw'][last])}" if freed[last] == 1 else
                              f"the graph was dropped in step {int(ix['free_step'][last])}")
    if peak:
        ends = np.where(np.isnan(t_freed), math.inf, t_freed)
        less_ends = ends.copy()
        less_ends[kept] = np.fmin(ends[kept], end)
        less = Timeline(*union(sid, t_saved, less_ends, s_nbytes))
        until = float(np.max(np.where(np.isnan(tk), math.inf, tk)))
        out["retain_saving_bytes"] = tl.peak_in(end, until) - less.peak_in(end, until)
        out["retain_peak_saving_bytes"] = tl.peak() - less.peak()
    return out


def _modules(lg, mods, sid, s_nbytes) -> None:
    """Bytes each module's forward (with its children) saved for each backward; NA where not measured."""
    s_first = np.frombuffer(lg.s_first, dtype=np.int64) if len(lg.s_first) else np.zeros(0, np.int64)
    module = np.array(lg.module, dtype=object)
    bws = [b for b in lg.used if b in lg.bw]
    measured = mods["backward"].isin(list(lg.bw)).to_numpy()
    vals = np.zeros(len(mods))
    if bws:
        rows = [np.frombuffer(lg.used[b], dtype=np.int64) for b in bws]
        b_of = np.repeat(np.array(bws, dtype=np.int64), [len(r) for r in rows])
        ns = max(len(s_nbytes), 1)
        pair = np.unique(b_of * ns + sid[np.concatenate(rows)])  # each storage once per backward
        pb, ps = pair // ns, pair % ns
        d = pd.DataFrame({"backward": pb, "owner": module[s_first[ps]], "nbytes": s_nbytes[ps]})
        d = d[d["owner"].notna()].groupby(["backward", "owner"], as_index=False)["nbytes"].sum()
        owners = pd.Series(d["owner"].unique())
        anc = pd.DataFrame({"owner": owners, "module": owners.map(_ancestors)}).explode("module")
        roll = d.merge(anc, on="owner").groupby(["backward", "module"])["nbytes"].sum()
        key = pd.MultiIndex.from_arrays([mods["backward"], mods["module"].astype(object).fillna("")])
        vals = roll.reindex(key).fillna(0).to_numpy()
    mods["saved_bytes"] = _masked(vals, measured)


def _ancestors(name: str) -> list:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a', ''] (the root module is '')."""
    out = [name]
    while name:
        name = name.rpartition(".")[0]
        out.append(name)
    return out
