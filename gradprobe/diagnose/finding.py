"""The Finding record: one diagnosis a user can act on, built from the `findings` table."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..text import records

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    message: str
    site: str | None = None
    nbytes: int | None = None
    step: int | None = None
    params: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message}"


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


def sort_findings(df: pd.DataFrame) -> pd.DataFrame:
    """Most severe first; within a severity, earliest step first (stable otherwise)."""
    if df.empty:
        return df.reset_index(drop=True)
    key = df["severity"].map(severity_rank)
    order = pd.DataFrame({"k": key, "s": df["step"].astype("Float64").fillna(float("inf"))})
    return df.loc[order.sort_values(["k", "s"], kind="stable").index].reset_index(drop=True)


def findings_from_table(df: pd.DataFrame) -> list[Finding]:
    out = []
    for row in records(sort_findings(df)):
        out.append(Finding(
            kind=row["kind"], severity=row["severity"], message=row["message"], site=row.get("site"),
            nbytes=None if row.get("nbytes") is None else int(row["nbytes"]),
            step=None if row.get("step") is None else int(row["step"]),
            params=list(row.get("params") or []),
        ))
    return out
