"""Wording shared by the rules: names, module labels, what was sampled. Pure pandas, never torch."""

from __future__ import annotations

import pandas as pd

from ..tables.counts import step_counts
from ..text import is_missing


CAUSE_TEXT = {  # why parameters got no gradient, for the causes that are not a cut
    "not_in_graph": "their module ran in forward but nothing of it reached the loss",
    "not_used": "their module never ran in forward",
}


def listed(params: list[str], shown: int = 1) -> str:
    """`a`, or `a` and 3 more."""
    head = ", ".join(f"`{p}`" for p in params[:shown])
    more = len(params) - shown
    return head + (f" and {more} more" if more > 0 else "")


def col(df: pd.DataFrame, c: str) -> pd.Series:
    """A column, or all-missing when the table lacks it (a run saved by an older version)."""
    return df[c] if c in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def module_label(tables: dict, module) -> str:
    """` (in Generator.forward)` / ` (in heads.aux: Linear.forward)`; empty when outside any module."""
    if is_missing(module):
        return ""
    mods = tables["modules"]
    types = mods.loc[mods["module"] == module, "type"].dropna() if "type" in mods else []
    kind = types.iloc[0] if len(types) else None
    if kind is None:
        return f" (in {module or 'the model'})"
    return f" (in {module}: {kind}.forward)" if "." in module else f" (in {kind}.forward)"


def sampled_note(tables: dict) -> str:
    """` (Seen in 6 sampled steps of 60; ...)` when per-parameter detail was sampled, else ``."""
    total, detail = step_counts(tables)
    if detail >= total:
        return ""
    return (f" (Seen in {detail} sampled step{'s' if detail != 1 else ''} of {total}; whether a gradient "
            f"arrived was checked in all {total}: see the backward table's params_none.)")


def sampled_steps(tables: dict) -> str:
    """' (seen in 3 sampled steps of 60: saved tensors are recorded only on ...)' when the schedule sampled,
    else ''."""
    total, detail = step_counts(tables)
    if total == 0 or detail >= total:
        return ""
    return (f" (seen in {detail} sampled step{'s' if detail != 1 else ''} of {total}: saved tensors are "
            "recorded only on the steps the schedule captures in full)")


def amp_skipped_steps(tables: dict) -> set:
    steps = tables.get("steps")
    if steps is None or steps.empty:
        return set()
    return set(steps.loc[steps["amp_skipped"], "step"])
