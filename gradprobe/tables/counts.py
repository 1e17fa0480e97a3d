"""How many steps a run has, and how many were captured in full: the one count the summary, the report
and every finding use (the steps table and backward rows together). Pure pandas."""

from __future__ import annotations


def step_counts(tables: dict) -> tuple[int, int]:
    """(steps seen, steps captured in full detail): steps table and backward rows together. In a run merged
    from many ranks, step numbers are the same on every rank: these are counts per rank, never summed."""
    seen, detail = set(), set()
    for name in ("steps", "backward"):
        df = tables.get(name)
        if df is not None and len(df) and "step" in df:
            seen |= set(df["step"].dropna().astype("int64").tolist())
            if "detail" in df:
                d = df["detail"].astype("boolean").fillna(False).to_numpy(dtype=bool)
                detail |= set(df.loc[d, "step"].astype("int64").tolist())
    return len(seen), len(detail)


def last_step(tables: dict):
    """The run's last step: the highest step that finished or had a backward (None: no step at all)."""
    highest = [int(df["step"].max()) for name in ("steps", "backward")
               if (df := tables.get(name)) is not None and not df.empty]
    return max(highest) if highest else None


def sampled_of(tables: dict):
    """The run's number of steps when detail (cuts, saved tensors, per-parameter rows) was recorded on a
    sample of them, else None: span's `of` for steps seen only in detail."""
    seen, detail = step_counts(tables)
    return seen if seen and detail < seen else None
