"""Derived tables: the forward graphs no backward used, from the saved table. Pure pandas, vectorised."""

from __future__ import annotations

import weakref

import pandas as pd


def unused_graphs(tables: dict) -> pd.DataFrame:
    """One row per graph (forward) that no backward used and that is released, indexed by graph id:
    site, step, act (what no_grad would have saved), modules and params (what its saved tensors came from)."""
    saved = tables.get("saved")
    if saved is None or saved.empty or "graph" not in saved:
        return pd.DataFrame(columns=["site", "step", "act", "modules", "params"])
    global _last
    if _last is not None and _last[0]() is saved and _last[1] == len(saved):  # one diagnosis's rules share it
        return _last[2].copy()
    per = _unused_graphs(saved)
    _last = (weakref.ref(saved), len(saved), per)
    return per.copy()


_last = None


def _sets(rows: pd.DataFrame, col: str) -> dict:
    """graph id -> set of the column's distinct values (one pass over the distinct pairs)."""
    pairs = rows[["graph", col]].dropna().drop_duplicates()
    out: dict = {}
    for gid, v in zip(pairs["graph"].tolist(), pairs[col].tolist()):
        out.setdefault(gid, set()).add(v)
    return out


def _unused_graphs(saved: pd.DataFrame) -> pd.DataFrame:
    cols = pd.DataFrame({
        "graph": saved["graph"], "site": saved["site"], "step": saved["step"],
        "used": saved["backward"].notna(), "released": saved["freed_by"] != "alive",
        # what no_grad would save: storages that exist only because of the graph (never parameters/buffers)
        "act": saved["nbytes"].where(saved["kind"].isin(("activation", "cast")), 0),
        "module": _col(saved, "module"), "param": _col(saved, "param")})
    per = cols.groupby("graph", sort=False).agg(site=("site", "first"), step=("step", "min"), used=("used", "any"),
                                                released=("released", "all"), act=("act", "sum"))
    per = per[~per["used"] & per["released"] & (per["act"] > 0)]
    if per.empty:
        return per.assign(modules=pd.Series(dtype=object), params=pd.Series(dtype=object))
    mine = cols[cols["graph"].isin(per.index)]
    mods, pars = _sets(mine, "module"), _sets(mine, "param")
    per["modules"] = pd.Series([mods.get(gid, set()) for gid in per.index], index=per.index, dtype=object)
    per["params"] = pd.Series([pars.get(gid, set()) for gid in per.index], index=per.index, dtype=object)
    return per


def _col(df: pd.DataFrame, c: str) -> pd.Series:
    return df[c] if c in df else pd.Series([None] * len(df), index=df.index, dtype=object)
