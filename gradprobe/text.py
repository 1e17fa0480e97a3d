"""Small text helpers shared by summary, findings, figures and the report. Pure pandas."""

from __future__ import annotations

import pandas as pd


def is_missing(v) -> bool:
    """None, NaN or pd.NA (lists and strings are never missing)."""
    return v is None or (not isinstance(v, (str, list, tuple)) and pd.isna(v))


def records(df: pd.DataFrame) -> list[dict]:
    """Rows as dicts with missing values as None (pandas gives NaN for a missing str)."""
    return [{k: (None if is_missing(v) else v) for k, v in r.items()} for r in df.to_dict("records")]


def human_bytes(n, missing: str = "", exact: bool = False) -> str:
    """1536 -> '1.5 KiB' (exact: '1.5 KiB (1,536 bytes)'); a missing size is not 0 bytes."""
    if is_missing(n):
        return missing
    n = int(n)
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            break
        v /= 1024
    if unit == "B":
        return f"{n:,} bytes" if exact else f"{n} B"
    return f"{v:.1f} {unit} ({n:,} bytes)" if exact else f"{v:.1f} {unit}"


def span(values, noun: str) -> str:
    """[3] -> 'step 3'; [0, 2] -> 'steps 0, 2'; many -> '20 steps (0..38)'."""
    v = sorted({int(x) for x in values})
    if len(v) == 1:
        return f"{noun} {v[0]}"
    if len(v) <= 4:
        return f"{noun}s " + ", ".join(map(str, v))
    return f"{len(v)} {noun}s ({v[0]}..{v[-1]})"
