"""Where collectors append plain records (names, numbers, strings), column by column.

Column lists keep long runs cheap (no dict per row); `frame()` turns a table
into a typed DataFrame through schema.py.
"""

from __future__ import annotations

import pandas as pd

from .schema import TABLES, frame


class Store:
    def __init__(self) -> None:
        self.cols: dict[str, dict[str, list]] = {t: {c: [] for c in spec} for t, spec in TABLES.items()}
        self.version = 0  # bumps on every write, so readers can cache

    def add(self, table: str, **row) -> None:
        self.extend(table, 1, **{k: [v] for k, v in row.items()})

    def extend(self, table: str, n: int, **cols) -> None:
        """Append n rows; a column given as a non-list value is repeated, a missing one is None."""
        if n == 0:
            return
        spec = self.cols[table]
        unknown = set(cols) - set(spec)
        if unknown:
            raise KeyError(f"table {table!r} has no column(s) {sorted(unknown)}")
        for c, values in spec.items():
            v = cols.get(c)
            values.extend(v if isinstance(v, list) else [v] * n)
        self.version += 1

    def frame(self, table: str) -> pd.DataFrame:
        return frame(table, self.cols[table])
