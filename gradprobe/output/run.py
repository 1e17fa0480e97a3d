"""The read API shared by a live Probe and a run loaded from disk.

Everything here derives from two things the subclass provides: `to_pandas()`
(dict of tables, see tables/schema.py) and `meta` (a JSON-able dict: torch version,
device, model summary, options). Nothing here touches torch.
"""

from __future__ import annotations

import pandas as pd

from ..diagnose.finding import Finding, findings_from_table
from ..text import plural
from .figures import make_figures
from .merge import merge_runs, rank_path
from .report import summary_html, write_report
from .runfile import read_run, save_run
from ..tables.counts import step_counts
from .summary import summarize


DEFAULT_REPORT = "gradprobe-report.html"


def describe(tables: dict[str, pd.DataFrame], meta: dict) -> str:
    """One short line: model, steps, backwards, findings by severity."""
    n_steps, _ = step_counts(tables)
    ranks = (meta or {}).get("ranks")
    where = f"{plural(len(ranks), 'rank')}, " if isinstance(ranks, list) and len(ranks) > 1 else ""
    bw = tables.get("backward")
    f = tables.get("findings")
    sev = "" if f is None or f.empty else " (" + ", ".join(
        f"{int(n)} {s}" for s, n in f["severity"].value_counts().items()) + ")"
    nf = 0 if f is None else len(f)
    return (f"{(meta or {}).get('model', '?')}: {where}{plural(n_steps, 'step')}, "
            f"{plural(0 if bw is None else len(bw), 'backward')}, {plural(nf, 'finding')}{sev}")


class RunView:
    meta: dict

    def to_pandas(self) -> dict[str, pd.DataFrame]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def findings(self) -> list[Finding]:
        return findings_from_table(self.to_pandas()["findings"])

    def summary(self) -> str:
        return summarize(self.to_pandas(), self.meta)

    def figures(self) -> dict:
        return make_figures(self.to_pandas(), self.meta)

    def report(self, path=None, *, per_rank: bool = True) -> str:
        """Write the HTML report and return its path; without a path, `gradprobe-report.html` here
        (and say where it went). One rank of a distributed job writes `report.rank{r}.html` for
        `report.html` unless `per_rank=False`."""
        given = path
        path = DEFAULT_REPORT if path is None else path
        if per_rank:
            path = rank_path(path, self.meta)
        out = write_report(self.to_pandas(), self.meta, path)
        if given is None:
            import os
            import sys
            print(f"gradprobe: report written to {os.path.abspath(out)}", file=sys.stderr)
        return out

    def save(self, path, *, per_rank: bool = True) -> str:
        """Save the run to one file and return its path. One rank of a distributed job (meta `rank`,
        `world_size` > 1) writes `run.rank{r}.gprobe` for `run.gprobe` unless `per_rank=False`; merge the
        ranks' files with `gradprobe.load([...])` or `gradprobe report run.rank*.gprobe`."""
        return save_run(self.to_pandas(), self.meta, rank_path(path, self.meta) if per_rank else path)

    def _repr_html_(self) -> str:
        return summary_html(self.to_pandas(), self.meta)


class Run(RunView):
    """A run loaded from disk: the same read API as a live Probe (findings, figures, report...)."""

    def __init__(self, tables: dict[str, pd.DataFrame], meta: dict, path: str | None = None):
        self._tables = tables
        self.meta = meta
        self.path = path

    def to_pandas(self) -> dict[str, pd.DataFrame]:
        """Copies, so that editing them never changes the run (list cells are copied too)."""
        out = {}
        for name, df in self._tables.items():
            df = df.copy()
            for c in df.columns[df.dtypes == object]:
                df[c] = df[c].map(lambda v: list(v) if isinstance(v, list) else v)
            out[name] = df
        return out

    def _where(self) -> str:
        if self.path:
            return self.path
        src = self.meta.get("sources") if isinstance(self.meta, dict) else None
        if isinstance(src, list) and src:
            return f"(merged from {plural(len(src), 'file')})"
        return "(not saved)"

    def __repr__(self) -> str:
        return f"<gradprobe.Run {self._where()}: {describe(self._tables, self.meta)}>"

    def __str__(self) -> str:
        return f"gradprobe run {self._where()}: {describe(self._tables, self.meta)}"


def load(path) -> Run:
    """Load a run saved by `probe.save(path)`: the same read API as a live Probe. A list or tuple of
    paths (the per-rank files of one distributed job) is merged into one run with a `rank` column in
    every table and findings aggregated across ranks (see output/merge.py)."""
    if isinstance(path, (list, tuple)):
        paths = list(path)
        if not paths:
            raise ValueError("gradprobe.load([]): give one or more run files, e.g. glob.glob('run.rank*.gprobe')")
        tables, meta = merge_runs([read_run(p) for p in paths])
        return Run(tables, meta, None)
    return Run(*read_run(path))
