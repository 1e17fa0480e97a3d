"""The read API shared by a live Probe and a run loaded from disk.

Everything here derives from two things the subclass provides: `to_pandas()`
(dict of tables, see schema.py) and `meta` (a JSON-able dict: torch version,
device, model summary, options). Nothing here touches torch.
"""

from __future__ import annotations

import pandas as pd

from .finding import Finding, findings_from_table


DEFAULT_REPORT = "gradprobe-report.html"


def describe(tables: dict[str, pd.DataFrame], meta: dict) -> str:
    """One short line: model, steps, backwards, findings by severity."""
    from .summary import step_counts
    from .text import plural
    n_steps, _ = step_counts(tables)
    bw = tables.get("backward")
    f = tables.get("findings")
    sev = "" if f is None or f.empty else " (" + ", ".join(
        f"{int(n)} {s}" for s, n in f["severity"].value_counts().items()) + ")"
    nf = 0 if f is None else len(f)
    return (f"{(meta or {}).get('model', '?')}: {plural(n_steps, 'step')}, "
            f"{plural(0 if bw is None else len(bw), 'backward')}, {plural(nf, 'finding')}{sev}")


class RunView:
    meta: dict

    def to_pandas(self) -> dict[str, pd.DataFrame]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def findings(self) -> list[Finding]:
        return findings_from_table(self.to_pandas()["findings"])

    def summary(self) -> str:
        from .summary import summarize
        return summarize(self.to_pandas(), self.meta)

    def figures(self) -> dict:
        from .figures import make_figures
        return make_figures(self.to_pandas(), self.meta)

    def report(self, path=None) -> str:
        """Write the HTML report and return its path; without a path, `gradprobe-report.html` here
        (and say where it went)."""
        from .report import write_report
        if path is None:
            import os
            import sys
            out = write_report(self.to_pandas(), self.meta, DEFAULT_REPORT)
            print(f"gradprobe: report written to {os.path.abspath(out)}", file=sys.stderr)
            return out
        return write_report(self.to_pandas(), self.meta, path)

    def save(self, path) -> str:
        from .runfile import save_run
        return save_run(self.to_pandas(), self.meta, path)

    def _repr_html_(self) -> str:
        from .report import summary_html
        return summary_html(self.to_pandas(), self.meta)
