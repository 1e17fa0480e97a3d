"""Small text helpers shared by summary, findings, figures and the report. Pure pandas."""

from __future__ import annotations

import linecache
import os
import re

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


def human(n) -> str:
    """1536 -> '1.5 KiB (1,536 bytes)'."""
    return human_bytes(n, missing="an unknown number of bytes", exact=True)


_PLURAL = {"backward": "backward calls"}


def span(values, noun: str, last=None, of=None) -> str:
    """[3] -> 'step 3'; [0, 2] -> 'steps 0, 2'; many -> '20 steps (0..38)'.

    last: the run's last step (`last_step`): a value after it (a forward after the last optimizer step)
    is said as 'the time after step 59', never as a step the run did not have. of: how many there were in
    the run when `values` are a sample of them: '6 sampled steps of 60 (0..41)'."""
    v = sorted({int(x) for x in values})
    after = ""
    if last is not None and v and v[-1] > int(last):
        v = [x for x in v if x <= int(last)]
        after = f"the time after step {int(last)}"
    many = _PLURAL.get(noun, noun + "s")
    sampled = of is not None and int(of) > len(v)
    if not v:
        return after
    if len(v) == 1 and not sampled:
        text = f"{noun} {v[0]}"
    elif len(v) <= 4:
        text = f"{many if len(v) > 1 else noun} " + ", ".join(map(str, v))
        text += f" (sampled: {len(v)} of {int(of)})" if sampled else ""
    else:
        text = f"{len(v)} {'sampled ' if sampled else ''}{many}{f' of {int(of)}' if sampled else ''} ({v[0]}..{v[-1]})"
    return f"{text} and {after}" if after else text


def plural(n: int, word: str, many: str | None = None) -> str:
    """1 -> '1 row'; 2 -> '2 rows' (numbers with thousands separators)."""
    n = int(n)
    return f"{n:,} {word}" if n == 1 else f"{n:,} {many or word + 's'}"


_CELL = re.compile(r"(?:^|/)ipykernel_\d+/(\d+)\.py$")


def split_site(site) -> tuple[str, int] | None:
    """'path/to/file.py:42' -> ('path/to/file.py', 42); None when it is no FILE:LINE."""
    if not isinstance(site, str):
        return None
    path, sep, line = site.strip().rpartition(":")
    if not sep or not path or not line.isdigit():
        return None
    return path, int(line)


def _cell_number(path: str) -> int | None:
    """The execution count of a notebook cell from IPython's own map, when a kernel is running."""
    try:
        from IPython import get_ipython  # noqa: PLC0415 - optional, only inside notebooks
        ip = get_ipython()
        fmap = getattr(getattr(ip, "compile", None), "_filename_map", None) or {}
        n = fmap.get(path)
        return int(n) if n is not None else None
    except Exception:
        return None


def site_label(site) -> str:
    """A site as a user recognises it: notebook cells (/tmp/ipykernel_1/23.py:4) as 'cell N, line 4'."""
    if is_missing(site):
        return ""
    parts = split_site(site)
    if parts is None or not _CELL.search(parts[0]):
        return str(site)
    n = _cell_number(parts[0])
    return f"{'cell ' + str(n) if n is not None else 'notebook cell'}, line {parts[1]}"


def source_line(site) -> str | None:
    """The source text at a FILE:LINE site (stripped), when linecache has it; None otherwise."""
    parts = split_site(site)
    if parts is None:
        return None
    path, line = parts
    try:
        text = linecache.getline(path, line)
        if not text and not os.path.isabs(path):
            text = linecache.getline(os.path.abspath(path), line)
    except Exception:
        return None
    text = text.strip()
    return text or None


def with_source(site, width: int = 100) -> str:
    """'train.py:12: loss = crit(out.detach(), y)'; the bare site when the source is not available."""
    label = site_label(site)
    src = source_line(site)
    if not src:
        return label
    if len(src) > width:
        src = src[: width - 3] + "..."
    return f"{label}: {src}"
