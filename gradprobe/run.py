"""The read API shared by a live Probe and a run loaded from disk.

Everything here derives from two things the subclass provides: `to_pandas()`
(dict of tables, see schema.py) and `meta` (a JSON-able dict: torch version,
device, model summary, options). Nothing here touches torch.
"""

from __future__ import annotations

import pandas as pd

from .finding import Finding, findings_from_table


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

    def report(self, path) -> str:
        from .report import write_report
        return write_report(self.to_pandas(), self.meta, path)

    def save(self, path) -> str:
        from .runfile import save_run
        return save_run(self.to_pandas(), self.meta, path)

    def _repr_html_(self) -> str:
        from .report import summary_html
        return summary_html(self.to_pandas(), self.meta)
