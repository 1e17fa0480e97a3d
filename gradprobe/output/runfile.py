"""Save a run to one file and load it back: a zip of meta.json and one Parquet file per table.

One file so a run can be mailed or attached to an issue; Parquet so that dtypes survive
(str with missing values, nullable Int64, NaN, bool). The schema's dtypes are reapplied on
load and list cells come back as Python lists, so a loaded run equals the saved one exactly.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from pathlib import Path

import pandas as pd

from .files import writable_path, write_atomic
from ..tables.schema import LIST, TABLES, conform, empty

FORMAT = "gradprobe-run"
VERSION = 1


class RunFileError(ValueError):
    """A file that is not a readable gradprobe run (foreign, truncated, corrupt, too new)."""


def _to_parquet(name: str, df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    try:
        df.to_parquet(buf, engine="pyarrow", compression="zstd")
    except Exception as e:  # pyarrow raises several types for unconvertible object columns
        raise ValueError(f"table {name!r} cannot be saved: {e}") from None
    return buf.getvalue()


def save_run(tables: dict[str, pd.DataFrame], meta: dict, path) -> str:
    """Write every table and meta into one run file at `path`; returns the path."""
    p = writable_path(path, "run", "run.gprobe")
    head = {"format": FORMAT, "version": VERSION, "tables": list(tables), "meta": meta or {}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("meta.json", json.dumps(head, indent=1, default=str), compress_type=zipfile.ZIP_DEFLATED)
        for name, df in tables.items():
            z.writestr(f"tables/{name}.parquet", _to_parquet(name, df))  # zstd inside: store as is
    write_atomic(p, buf.getvalue(), "run")
    return str(p)


def _restore(name: str, df: pd.DataFrame, list_cols: set[str]) -> pd.DataFrame:
    """List cells back to Python lists; schema dtypes reapplied (files from other writers too)."""
    for c in df.columns:
        if c in list_cols:
            df[c] = pd.Series([v.tolist() if hasattr(v, "tolist") else v for v in df[c]],
                              index=df.index, dtype=object)
    return conform(name, df)


def _read_table(z: zipfile.ZipFile, member: str, name: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(z.read(member)))
    list_cols = {f.name for f in table.schema if str(f.type).startswith(("list", "large_list"))}
    list_cols |= {c for c, d in TABLES.get(name, {}).items() if d == LIST}
    return _restore(name, table.to_pandas(), list_cols)


def read_run(path) -> tuple[dict[str, pd.DataFrame], dict, str]:
    """Tables, meta and path of a run saved by `probe.save(path)`. Raises FileNotFoundError or RunFileError
    (one line)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such run file: {p}")
    if p.is_dir():
        raise RunFileError(f"{p} is a directory, not a gradprobe run file (make one with probe.save(path))")
    with open(p, "rb") as f:
        magic = f.read(4)
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            if "meta.json" not in names:
                raise RunFileError(f"{p} is a zip file but not a gradprobe run (no meta.json)")
            try:
                head = json.loads(z.read("meta.json"))
            except ValueError:
                raise RunFileError(f"{p}: meta.json is not valid JSON; the run file is corrupt") from None
            if not isinstance(head, dict) or head.get("format") != FORMAT:
                raise RunFileError(f"{p} is not a gradprobe run (meta.json has no format {FORMAT!r})")
            version = head.get("version")
            if isinstance(version, bool) or not isinstance(version, int):
                raise RunFileError(f"{p}: meta.json has no valid run format version (got {version!r}); the run "
                                   "file is corrupt or was not written by gradprobe's probe.save()")
            if version > VERSION:
                raise RunFileError(f"{p} was written by a newer gradprobe (run format version "
                                   f"{head['version']} > {VERSION}); upgrade gradprobe to read it")
            order = list(head.get("tables") or [])
            stored = [n[len("tables/"):-len(".parquet")] for n in z.namelist()
                      if n.startswith("tables/") and n.endswith(".parquet")]
            tables = {}
            for name in dict.fromkeys(order + stored):
                if name in stored:
                    tables[name] = _read_table(z, f"tables/{name}.parquet", name)
            for name in TABLES:  # a run always has every table, possibly empty
                tables.setdefault(name, empty(name))
    except RunFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        if magic.startswith(b"PK"):
            raise RunFileError(f"{p} is truncated or corrupt ({type(e).__name__}: {e}); save the run again") from None
        raise RunFileError(f"{p} is not a gradprobe run file (make one with probe.save(path))") from None
    return tables, head.get("meta") or {}, str(p)
