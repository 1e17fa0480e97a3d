"""Plain-text summary of a run, for terminals and logs. Pure pandas."""

from __future__ import annotations

import pandas as pd

from .finding import findings_from_table
from .text import human_bytes


def summarize(tables: dict, meta: dict) -> str:
    params, backward = tables["params"], tables["backward"]
    steps = backward["step"].nunique() if not backward.empty else 0
    lines = [f"gradprobe run: {steps} step(s), {len(backward)} backward call(s); model {meta.get('model', '?')}"]
    if backward.empty:
        lines.append("Nothing was recorded: no backward call ran while the probe was active.")
    if not params.empty:
        last = params.drop_duplicates("param", keep="last")
        counts = last["status"].value_counts()
        lines.append("Parameters by status in their last backward: " + ", ".join(
            f"{s} {int(counts.get(s, 0))}" for s in ("flow", "zero", "nonfinite", "none", "frozen")))
        none = params[params["status"] == "none"]
        if not none.empty:
            lines.append("No gradient (cause at site: parameters):")
            for (cause, site), g in none.groupby(["cause", "site"], dropna=False, sort=False):
                where = "" if pd.isna(site) else f" at {site}"
                names = list(dict.fromkeys(g["param"]))
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                lines.append(f"  {cause}{where}: {shown} (in {g['backward'].nunique()} backward call(s))")
        frozen = last.loc[last["status"] == "frozen", "param"].tolist()
        if frozen:
            lines.append(f"Frozen: {', '.join(frozen[:6])}{' ...' if len(frozen) > 6 else ''}")
    saved = tables.get("saved")
    if saved is not None and not saved.empty:
        mem = tables["memory"]
        peak = next((mem[c].max() for c in ("peak_saved_bytes", "live_saved_bytes") if c in mem and len(mem)), None)
        cf = mem["peak_counterfactual_bytes"].max() if "peak_counterfactual_bytes" in mem and len(mem) else None
        lines.append(f"Saved for backward: {human_bytes(saved['nbytes'].sum(), 'n/a')} in {len(saved)} tensors; "
                     f"peak live {human_bytes(peak, 'n/a')}"
                     + (f" ({human_bytes(cf)} had each graph been freed at its first backward)"
                        if cf is not None and pd.notna(cf) and cf != peak else ""))
    findings = findings_from_table(tables["findings"])
    lines.append(f"Findings ({len(findings)}):" if findings else "Findings: none.")
    for f in findings:
        lines.append(f"  [{f.severity}] {f.kind}: {f.message}")
    return "\n".join(lines)
