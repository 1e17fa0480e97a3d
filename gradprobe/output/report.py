"""One self-contained HTML report: findings first, then summary, figures and bounded tables.

plotly.js is embedded once in the page and every figure refers to it, so the file opens
offline and nothing is fetched from a CDN. Nothing here touches torch: the report only
assembles figures (output/figures/) and findings (diagnose/finding.py) from the run tables.
"""

from __future__ import annotations

import datetime
import html
import itertools
import re

import pandas as pd

from .figures import make_figures
from .summary import memory_headline, memory_lines, not_recorded, summarize
from ..text import human_bytes, is_missing, plural, site_label, source_line
from ..diagnose.finding import sort_findings
from .files import write_atomic, writable_path
from ..tables.schema import TABLES

ROWS_EACH_END = 200  # a table longer than 2x this shows its first and last rows only

CAPTIONS = {
    "flow_by_layer": "Mean and max gradient norm of each parameter, in forward order, over the backwards "
                     "where a gradient flowed. The strip below marks parameters that got no gradient, an "
                     "exactly-zero one, NaN/Inf, or were frozen, in how many backwards (hover for the cause).",
    "flow_over_time": "Gradient norm of every parameter at every step (max over the step's backwards). "
                      "A blank cell is a step where that parameter received no finite, non-zero gradient.",
    "branches": "The module tree of the last step, one panel per backward call, sized by parameter count "
                "and coloured by what reached each module.",
    "cuts": "Lines where a tensor that depended on trainable parameters left the autograd graph "
            "(.detach(), .data, no_grad, .item(), argmax, ...). Red: a backward would have sent gradient "
            "through it; blue: the parameters it cut off trained in another backward (a GAN's "
            "discriminator step). Hover for the parameters it cut off.",
    "saved_memory": "Tensors kept alive for backward, by kind (activation / parameter / input), module and op.",
    "memory_timeline": "Bytes held by saved tensors and by the process over time; markers are findings at their step.",
    "no_grad_retain": "Bytes still held after a backward because of retain_graph=True, and graphs that no "
                      "backward used: torch.no_grad() around those forwards would have saved these bytes.",
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;
     padding:0 24px 48px;color:#222;line-height:1.45}
h1{margin:24px 0 4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;margin:0 0 8px} nav a{margin-right:14px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border-bottom:1px solid #e5e5e5;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6;position:sticky;top:0}
td.num{text-align:right;white-space:nowrap}
.sev{font-weight:600;border-radius:3px;padding:1px 6px;color:#fff;font-size:12px}
.sev-error{background:#d62828}.sev-warning{background:#e09f3e}.sev-info{background:#457b9d}
code{background:#f3f3f3;padding:0 3px;border-radius:3px} code.src{background:none;color:#555;font-size:12px}
pre{background:#f7f7f7;padding:12px;overflow-x:auto;font-size:13px;white-space:pre-wrap}
.figure{margin:18px 0 30px}.caption{color:#555;margin:2px 0 4px;max-width:1000px}
.note{color:#666;font-size:13px} details{margin:8px 0} summary{cursor:pointer;font-weight:600}
.table-wrap{max-height:600px;overflow:auto}
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


_TICKS = re.compile(r"`([^`\n]+)`")


def message_html(text) -> str:
    """A finding's message as HTML: escaped, with `code` in backticks rendered as <code>."""
    return _TICKS.sub(lambda m: f"<code>{m.group(1)}</code>", _esc(text))


def site_html(site) -> str:
    """`FILE:LINE` and, below it, the source line itself when linecache has it."""
    if is_missing(site):
        return ""
    out = f"<code>{_esc(site_label(site))}</code>"
    src = source_line(site)
    if src:
        out += f'<br><code class="src">{_esc(src if len(src) <= 120 else src[:117] + "...")}</code>'
    return out


def findings_html(findings: pd.DataFrame, empty_reason: list[str] | None = None) -> str:
    """The findings as an HTML table, most severe first; when there are none, why."""
    if findings is None or findings.empty:
        if empty_reason:
            return ('<p class="note">No findings could be made: '
                    + " ".join(_esc(r) for r in empty_reason) + "</p>")
        return '<p class="note">No findings: nothing in this run looked wrong.</p>'
    rows = []
    for f in sort_findings(findings).to_dict("records"):
        sev = str(f.get("severity"))
        params = f.get("params")
        params = list(params) if isinstance(params, (list, tuple)) else []
        shown = ", ".join(params[:10]) + (f" and {len(params) - 10} more" if len(params) > 10 else "")
        rows.append(
            f'<tr><td><span class="sev sev-{_esc(sev)}">{_esc(sev)}</span></td><td>{_esc(f.get("kind"))}</td>'
            f'<td>{message_html(f.get("message"))}'
            + (f'<br><span class="note">parameters: {_esc(shown)}</span>' if shown else "")
            + f'</td><td>{site_html(f.get("site"))}</td>'
            f'<td class="num">{_esc(human_bytes(f.get("nbytes")))}</td>'
            f'<td class="num">{"" if is_missing(f.get("step")) else int(f["step"])}</td></tr>')
    head = "<tr><th>severity</th><th>kind</th><th>message</th><th>site</th><th>bytes</th><th>step</th></tr>"
    return f'<table class="findings">{head}{"".join(rows)}</table>'


def headline_html(tables: dict[str, pd.DataFrame], meta: dict) -> str:
    """What was not recorded (and why), then the memory headline: the summary's own lines."""
    parts = [f'<p class="note missing">{_esc(r)}</p>' for r in not_recorded(tables, meta)]
    mem = memory_lines(memory_headline(tables))
    if mem:
        parts.append(f'<pre class="memory-headline">{_esc(chr(10).join(mem))}</pre>')
    return "".join(parts)


def _meta_line(meta: dict) -> str:
    items = [f"{k}: {v}" for k, v in (meta or {}).items() if not isinstance(v, (dict, list)) and v not in (None, "")]
    return " · ".join(_esc(i if len(i) < 120 else i[:117] + "...") for i in items)


def table_html(name: str, df: pd.DataFrame) -> str:
    """A readable table, bounded to the first and last ROWS_EACH_END rows of a long one."""
    n = len(df)
    if n > 2 * ROWS_EACH_END:
        shown = pd.concat([df.head(ROWS_EACH_END), df.tail(ROWS_EACH_END)])
        note = (f"{n:,} rows, showing the first {ROWS_EACH_END} and last {ROWS_EACH_END}; "
                "the full table is in run.to_pandas() or probe.save().")
    else:
        shown, note = df, plural(n, "row")
    body = shown.to_html(index=False, na_rep="–", border=0, escape=True, classes="data",
                         float_format=lambda v: f"{v:.4g}") if n else ""
    return (f'<details id="table-{_esc(name)}"><summary>{_esc(name)} — {_esc(plural(n, "row"))}</summary>'
            f'<p class="note">{_esc(note)}</p><div class="table-wrap">{body}</div></details>')


_SCOPE_IDS = itertools.count(1)


def scoped_css(css: str, scope: str) -> str:
    """Every rule of `css` limited to the element with class `scope` and its descendants.

    `body` becomes the root itself; every other selector is prefixed, so nothing outside the
    fragment (a Jupyter notebook's own h1, table, pre...) is restyled.
    """
    out = []
    for sel, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        parts = []
        for one in sel.split(","):
            one = one.strip()
            if not one:
                continue
            parts.append(f".{scope}" if one == "body" else f".{scope} {one}")
        out.append(",".join(parts) + "{" + body + "}")
    return "\n".join(out)


def summary_html(tables: dict[str, pd.DataFrame], meta: dict) -> str:
    """Summary and findings as an HTML fragment (Jupyter's _repr_html_), without plotly.

    Its style applies only to its own root element (a class unique to this fragment).
    """
    scope = f"gradprobe-{next(_SCOPE_IDS)}-{id(tables) & 0xFFFFFF:x}"
    findings = tables.get("findings")
    n = 0 if findings is None else len(findings)
    reason = not_recorded(tables, meta) if tables.get("backward") is None or tables["backward"].empty else None
    return (f'<div class="gradprobe {scope}"><style>{scoped_css(CSS, scope)}</style>'
            f'<h3>gradprobe</h3><p class="meta">{_meta_line(meta)}</p>'
            f"<h4>Findings ({n})</h4>{findings_html(findings, reason)}"
            f"<h4>Summary</h4><pre>{_esc(summarize(tables, meta))}</pre></div>")


def build_html(tables: dict[str, pd.DataFrame], meta: dict) -> str:
    """The whole report page as a string."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    figs = make_figures(tables, meta)
    parts = []
    for name, fig in figs.items():
        div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                          config={"displaylogo": False, "responsive": True})
        parts.append(f'<div class="figure" id="fig-{name}"><h3>{_esc(name)}</h3>'
                     f'<p class="caption">{_esc(CAPTIONS.get(name, ""))}</p>{div}</div>')
    names = list(TABLES) + [k for k in tables if k not in TABLES]
    tables_html = "".join(table_html(k, tables[k]) for k in names if k in tables)
    findings = tables.get("findings")
    n = 0 if findings is None else len(findings)
    backward = tables.get("backward")
    reason = not_recorded(tables, meta) if backward is None or backward.empty else None
    created = datetime.datetime.now().isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gradprobe report</title>
<style>{CSS}</style>
<script type="text/javascript">/* plotly.js {get_plotlyjs_version()} (embedded once: the report works offline) */
{get_plotlyjs()}</script>
</head><body>
<h1>gradprobe report</h1>
<p class="meta">{_meta_line(meta)}</p>
<p class="meta">report written {created}</p>
<nav><a href="#findings">findings ({n})</a><a href="#summary">summary</a><a href="#figures">figures</a><a href="#tables">tables</a></nav>
<section id="findings"><h2>Findings ({n})</h2>{findings_html(findings, reason)}</section>
<section id="headline">{headline_html(tables, meta)}</section>
<section id="summary"><h2>Summary</h2><pre>{_esc(summarize(tables, meta))}</pre></section>
<section id="figures"><h2>Figures</h2>{"".join(parts)}</section>
<section id="tables"><h2>Tables</h2>{tables_html}</section>
</body></html>
"""


def write_report(tables: dict[str, pd.DataFrame], meta: dict, path) -> str:
    """Write the report to `path` (atomically: a failed write leaves no half file) and return the path."""
    p = writable_path(path, "report", "report.html")
    write_atomic(p, build_html(tables, meta).encode("utf-8"), "report")
    return str(p)
