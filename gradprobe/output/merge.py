"""One run from many ranks: per-rank file names, and merging per-rank runs into one. Pure pandas.

A rank's run knows `rank` and `world_size` in its meta (the capture puts them there when a process group
exists). Such a run saves to `run.rank{r}.gprobe` (and reports to `report.rank{r}.html`) when asked for
`run.gprobe`, so that the ranks of one job never overwrite each other's files.

Merging: every table gets an int `rank` column first (rows of all ranks, rank by rank); meta is rank 0's
(the lowest rank's) with `rank` replaced by `ranks` and `sources`, plus the values that differ between
ranks under `per_rank`. Findings are aggregated: the same root cause on several ranks is one finding.
"Same" is: same kind, same site and the same parameters (as a set). The message is the one of the rank
whose finding has the most bytes (ties and sizeless findings: the lowest rank), followed by
"Seen on ranks 0 and 1."; when the messages differ between ranks (numbers such as bytes, steps or counts),
that is said, naming the rank whose message is shown. The merged finding has the most severe severity,
the largest `nbytes` and the earliest `step`; its `rank` is the lowest rank and `ranks` lists all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..diagnose.finding import severity_rank, sort_findings
from ..tables.schema import TABLES, conform, empty, frame
from ..text import is_missing


def dist_rank(meta: dict | None) -> int | None:
    """This run's rank when it is one rank of a distributed job (world size > 1), else None."""
    meta = meta or {}
    r, w = meta.get("rank"), meta.get("world_size")
    if _is_int(r) and _is_int(w) and w > 1:
        return int(r)
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def rank_path(path, meta: dict | None):
    """`run.gprobe` -> `run.rank1.gprobe` for rank 1 of a distributed job; the path unchanged otherwise
    (and when its name already says the rank, e.g. `run.rank1.gprobe`)."""
    r = dist_rank(meta)
    if r is None:
        return path
    try:
        p = Path(os.fspath(path))
    except TypeError:
        return path  # writable_path says what is wrong with it
    stem, suffix = (p.stem, p.suffix) if p.suffix else (p.name, "")
    if stem.endswith(f".rank{r}") or stem == f"rank{r}":
        return path
    return str(p.with_name(f"{stem}.rank{r}{suffix}"))


def ranks_text(ranks) -> str:
    """[1] -> 'on rank 1'; [0, 1] -> 'on ranks 0 and 1'; [0, 1, 2] -> 'on ranks 0, 1 and 2'."""
    ranks = sorted(set(int(r) for r in ranks))
    if len(ranks) == 1:
        return f"on rank {ranks[0]}"
    if len(ranks) > 8 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"on {len(ranks)} ranks ({ranks[0]}-{ranks[-1]})"
    return "on ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def merge_runs(runs: list[tuple[dict, dict, str | None]]) -> tuple[dict[str, pd.DataFrame], dict]:
    """(tables, meta, path) of each rank -> (tables, meta) of one run with a `rank` column everywhere.

    Ranks come from each run's meta; runs without one (single-process runs) are numbered in the order
    given. Raises ValueError (one line) for runs that cannot be one job's ranks.
    """
    if not runs:
        raise ValueError("no runs to merge: give one or more run files (e.g. run.rank*.gprobe)")
    ranks = _ranks(runs)
    order = sorted(range(len(runs)), key=lambda i: ranks[i])
    runs = [runs[i] for i in order]
    ranks = [ranks[i] for i in order]
    names = list(dict.fromkeys(n for tables, _, _ in runs for n in tables))
    tables = {}
    for name in names:
        per = [(r, t[name]) for r, (t, _, _) in zip(ranks, runs) if name in t]
        if name == "findings":
            tables[name] = merge_findings(per, len(runs) > 1)
        else:
            tables[name] = _concat(name, per)
    return tables, _merge_meta(runs, ranks)


def _ranks(runs) -> list[int]:
    found = [dist_rank(meta) for _, meta, _ in runs]
    src = lambda i: runs[i][2] or f"run {i + 1}"  # noqa: E731
    if all(r is None for r in found):
        return list(range(len(runs)))
    missing = [src(i) for i, r in enumerate(found) if r is None]
    if missing:
        raise ValueError(f"{missing[0]} is not one rank of a distributed run (its meta has no rank and "
                         "world_size > 1); merge only the rank files of one job")
    seen: dict[int, int] = {}
    for i, r in enumerate(found):
        if r in seen:
            raise ValueError(f"{src(seen[r])} and {src(i)} are both rank {r}; merge the rank files of one job")
        seen[r] = i
    worlds = {runs[i][1].get("world_size") for i in range(len(runs))}
    if len(worlds) > 1:
        raise ValueError(f"the runs come from jobs of different sizes (world_size {sorted(worlds)}); "
                         "merge the rank files of one job")
    return found


def _with_rank(df: pd.DataFrame, r: int) -> pd.DataFrame:
    df = df.drop(columns=["rank"]) if "rank" in df.columns else df.copy()
    df.insert(0, "rank", pd.Series([r] * len(df), index=df.index, dtype="int64"))
    return df


def _concat(name: str, per: list[tuple[int, pd.DataFrame]]) -> pd.DataFrame:
    frames = [_with_rank(df, r) for r, df in per]
    cols = list(dict.fromkeys(c for f in frames for c in f.columns))
    full = [f for f in frames if len(f)]  # empty frames would make pandas guess dtypes (and warn)
    if not full:
        return frames[0].reindex(columns=cols)
    out = pd.concat(full, ignore_index=True).reindex(columns=cols)
    return conform(name, out)  # a column missing on one rank must not change a dtype


def merge_findings(per: list[tuple[int, pd.DataFrame]], say_ranks: bool = True) -> pd.DataFrame:
    """Findings of every rank, the same root cause (kind, site, set of parameters) once; see the module
    docstring. Columns: rank, then the findings schema, then `ranks` (list of int)."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    extra: list[str] = []
    for r, df in per:
        extra += [c for c in df.columns if c not in TABLES["findings"] and c not in ("rank", "ranks")]
        for row in df.to_dict("records"):
            row = {k: (None if is_missing(v) else v) for k, v in row.items()}
            params = list(row.get("params") or [])
            key = (row.get("kind"), row.get("site"), tuple(sorted(map(str, params))))
            groups.setdefault(key, []).append((r, row))
    rows, ranks = [], []
    for items in groups.values():
        rep_rank, rep = max(items, key=lambda it: (-1 if it[1].get("nbytes") is None else int(it[1]["nbytes"]),
                                                   -it[0]))
        rs = sorted({r for r, _ in items})
        msg = rep.get("message") or ""
        if say_ranks:
            differ = len({row.get("message") for _, row in items}) > 1
            seen = f"Seen {ranks_text(rs)}"
            if differ:
                largest = ", the one with the most bytes" if rep.get("nbytes") is not None else ""
                seen += f" (the details differ between ranks; shown: rank {rep_rank}'s{largest})"
            msg = f"{msg.rstrip()}{'' if msg.rstrip().endswith(('.', '!', '?')) else '.'} {seen}."
        nbytes = [int(row["nbytes"]) for _, row in items if row.get("nbytes") is not None]
        steps = [int(row["step"]) for _, row in items if row.get("step") is not None]
        row = {c: rep.get(c) for c in TABLES["findings"]}
        row.update(message=msg, severity=min((row_["severity"] for _, row_ in items), key=severity_rank),
                   nbytes=max(nbytes) if nbytes else None, step=min(steps) if steps else None,
                   params=list(rep.get("params") or []))
        rows.append((row, {c: rep.get(c) for c in dict.fromkeys(extra)}))
        ranks.append(rs)
    out = frame("findings", [r for r, _ in rows]) if rows else empty("findings")
    for c in dict.fromkeys(extra):
        out[c] = pd.Series([x[c] for _, x in rows], index=out.index, dtype=object)
    out.insert(0, "rank", pd.Series([rs[0] for rs in ranks], index=out.index, dtype="int64"))
    out["ranks"] = pd.Series(ranks, index=out.index, dtype=object)
    return sort_findings(out)


def _merge_meta(runs, ranks: list[int]) -> dict:
    metas = [dict(m or {}) for _, m, _ in runs]
    meta = {k: v for k, v in metas[0].items() if k != "rank"}
    differ = {}
    for k in dict.fromkeys(k for m in metas for k in m):
        if k == "rank":
            continue
        vals = [m.get(k) for m in metas]
        if any(v != vals[0] for v in vals):
            differ[k] = vals
            meta.setdefault(k, vals[0])
    meta["ranks"] = list(ranks)
    meta["sources"] = [p for _, _, p in runs]
    meta["merged"] = f"{len(runs)} run{'s' if len(runs) != 1 else ''}, {ranks_text(ranks)}"
    if differ:
        meta["per_rank"] = differ  # key -> one value per rank, in the order of `ranks`
    return meta


def merged_ranks(meta: dict | None, backward: pd.DataFrame | None) -> list[int]:
    """The ranks of a run merged from many ranks (its meta's `ranks`, else the backward table's `rank`
    column); [] for one rank's run."""
    ranks = (meta or {}).get("ranks")
    if not isinstance(ranks, list) and backward is not None and "rank" in backward:
        ranks = sorted(backward["rank"].unique().tolist())
    return [int(r) for r in ranks] if isinstance(ranks, list) and len(ranks) > 1 else []
