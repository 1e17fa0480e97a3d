"""Load a saved run with torch unimportable and print what a user reads from it, as canonical JSON.

    python tests/lowest_pandas.py RUN.gprobe[,RUN2.gprobe...] REPORT.html   (several: merged as ranks)

Run by tests/test_lowest_pandas.py under the lowest pandas/pyarrow/plotly that pyproject allows (the
venv `make venv-lowest` builds, without torch), and compared there with the same output of the live probe.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "gradprobe"


def v(x):
    """A cell as a plain value: None for every kind of missing, lists for arrays, Python numbers."""
    if isinstance(x, (list, tuple)) or type(x).__name__ == "ndarray":
        return [v(y) for y in x]
    if hasattr(x, "item") and not isinstance(x, str):
        x = x.item()
    if x is None or (isinstance(x, float) and math.isnan(x)) or type(x).__name__ in ("NAType", "NaTType"):
        return None
    return x


def canonical(tables: dict, summary: str, findings: list) -> dict:
    """What a user reads from a run, independent of the pandas version's dtypes."""
    findings = [{k: v(x) for k, x in dataclasses.asdict(f).items()} for f in findings]
    return {"tables": {name: {"columns": list(df.columns), "rows": [[v(x) for x in row] for row in
                                                                     df.astype(object).itertuples(index=False)]}
                       for name, df in sorted(tables.items())},
            "summary": summary, "findings": findings}


def _import_gradprobe_without_torch():
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    spec = importlib.util.spec_from_file_location("gradprobe", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["gradprobe"] = pkg
    pkg.__path__ = [str(ROOT)]
    pkg.__version__ = "test"
    return importlib.import_module("gradprobe.output.run")


def main(run_path: str, report_path: str) -> None:
    paths = run_path.split(",")
    run = _import_gradprobe_without_torch().load(paths if len(paths) > 1 else paths[0])
    import pandas as pd
    import plotly

    figures = run.figures()
    out = run.report(report_path)
    result = canonical(run.to_pandas(), run.summary(), run.findings)
    result["versions"] = {"pandas": pd.__version__, "plotly": plotly.__version__}
    result["figures"] = sorted(figures)
    result["report_bytes"] = pathlib.Path(out).stat().st_size
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
