"""The HTML report and its figures, from synthetic tables (no torch needed)."""

import ast
import html
import math
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from gradprobe.output.figures import make_figures
from gradprobe.output.report import summary_html, write_report

from synthetic import FINDINGS, big_run, empty_run, small_run

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["flow_by_layer", "flow_over_time", "branches", "cuts", "saved_memory", "memory_timeline",
           "no_grad_retain"]


class _Resources(HTMLParser):
    """Every src/href of a real tag (script text, where plotly.js lives, is not parsed as tags)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [(tag, k, v) for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def small_html(tmp_path_factory):
    tables, meta = small_run()
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert write_report(tables, meta, path) == str(path)
    return path.read_text(encoding="utf-8")


def test_plotlyjs_embedded_exactly_once(small_html):
    assert small_html.count(get_plotlyjs()) == 1
    assert small_html.count("Plotly.newPlot(") == len(FIGURES)
    bundled = re.search(r"plotly\.js v(\d+\.\d+\.\d+)", get_plotlyjs()).group(1)  # the bundle's own banner
    assert f"/* plotly.js {bundled} (embedded once" in small_html  # the comment names the JS, not plotly.py


def test_nothing_fetched_from_the_network(small_html):
    parser = _Resources()
    parser.feed(small_html)
    external = [u for u in parser.urls if u[2].startswith(("http:", "https:", "//"))]
    assert external == []
    assert 'src="http' not in small_html and "src='http" not in small_html
    rest = small_html.replace(get_plotlyjs(), "")  # the bundle's own code mentions URLs; the page must not
    assert "http://" not in rest and "https://" not in rest
    assert "mathjax" not in rest.lower()


def test_every_figure_and_section_present(small_html):
    for name in FIGURES:
        assert f'id="fig-{name}"' in small_html
    for section in ("findings", "summary", "figures", "tables"):
        assert f'<section id="{section}">' in small_html
    for table in ("params", "modules", "cuts", "saved", "backward", "memory", "findings"):
        assert f'id="table-{table}"' in small_html


def test_findings_first_most_severe_first(small_html):
    positions = [small_html.index(html.escape(f["message"])) for f in FINDINGS]
    for f, pos in zip(FINDINGS, positions):
        assert pos < small_html.index('<section id="summary">'), f["kind"]
    by_sev = {s: [p for f, p in zip(FINDINGS, positions) if f["severity"] == s] for s in ("error", "warning", "info")}
    assert max(by_sev["error"]) < min(by_sev["warning"]) and max(by_sev["warning"]) < min(by_sev["info"])
    assert "3.0 MiB" in small_html and "2.0 MiB" in small_html  # nbytes shown human-readable


def test_empty_run_explains_every_empty_figure(tmp_path):
    tables, meta = empty_run()
    figs = make_figures(tables, meta)
    assert list(figs) == FIGURES
    for name, fig in figs.items():
        assert len(fig.data) == 0 and fig.layout.annotations[0].text, name
    text = Path(write_report(tables, meta, tmp_path / "e.html")).read_text()
    assert "No findings" in text and "No cuts" in text


def test_output_never_imports_torch_and_figures_never_read_findings():
    """Architecture rule: plots, report, run file and CLI work from tables alone; a figure reads tables,
    never the findings (it draws facts, the findings give advice)."""
    files = sorted((ROOT / "gradprobe" / "output").rglob("*.py")) + [ROOT / "gradprobe" / "cli.py"]
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in imported, path
        if path.parent.name == "figures":
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            assert "findings" not in names and not any("diagnose" in (n.module or "") for n in ast.walk(tree)
                                                       if isinstance(n, ast.ImportFrom)), path


def test_flow_by_layer_marks_statuses_never_as_zero():
    tables, _ = small_run()
    fig = make_figures(tables, {})["flow_by_layer"]
    traces = {t.name: t for t in fig.data}
    mean = traces["mean ‖grad‖"]
    assert list(mean.x)[:2] == ["G.fc1.weight", "G.fc1.bias"]  # forward order kept
    ys = dict(zip(mean.x, mean.y))
    assert all(math.isnan(ys[p]) for p in ("D.aux.weight", "D.emb.weight", "D.norm.weight"))
    assert all(math.isnan(y) or y > 0 for y in mean.y)
    assert "D.aux.weight" in traces["no gradient"].x
    assert "cause: detach at train_gan.py:42" in " ".join(traces["no gradient"].hovertext)
    assert list(traces["frozen (requires_grad=False)"].x) == ["D.emb.weight"]
    assert list(traces["exactly zero"].x) == ["D.norm.weight"]
    assert set(traces["NaN / Inf"].x) == {"D.out.weight", "D.out.bias"}
    assert fig.layout.yaxis.type == "log"


def test_flow_over_time_bins_long_runs_honestly():
    tables, _ = big_run(n_steps=1200, n_params=6)
    fig = make_figures(tables, {})["flow_over_time"]
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (6, 400)  # 1200 steps, 3 per column
    assert "binned: 3 steps per column" in fig.layout.title.text
    assert np.isnan(z[3]).all() and np.isnan(z[5]).all()  # 'none' and 'frozen' params are gaps
    assert np.isfinite(z[0]).all()


def test_branches_one_panel_per_backward_of_last_step():
    tables, _ = small_run()
    fig = make_figures(tables, {})["branches"]
    trees = [t for t in fig.data if t.type == "treemap"]
    assert len(trees) == 2  # the GAN's D and G backwards of the last step
    titles = [a.text for a in fig.layout.annotations]
    assert any("backward 6" in t for t in titles) and any("backward 7" in t for t in titles)
    d_step = dict(zip(trees[1].ids, trees[1].marker.colors))
    assert d_step["G.fc1"] != d_step["D.fc1"]  # G got gradient in the G step, D did not


def test_cuts_hover_names_cut_off_parameters():
    tables, _ = small_run()
    fig = make_figures(tables, {})["cuts"]
    hover = " ".join(h for t in fig.data for h in t.hovertext)
    assert "G.fc2.weight" in hover and "D.aux.weight" in hover and "train_gan.py:42" in hover
    counts = {t.name: list(t.x) for t in fig.data}
    assert counts["cut a gradient a backward needed"] == [4]  # one detach per step, 4 steps
    assert counts["cut, but no backward would have used it"] == [8]


def test_memory_and_no_grad_figures():
    tables, _ = small_run()
    figs = make_figures(tables, {})
    names = [t.name for t in figs["memory_timeline"].data]
    assert "live saved tensors" in names
    tables["memory"] = tables["memory"].assign(counterfactual_saved_bytes=tables["memory"]["live_saved_bytes"] // 2)
    names = [t.name for t in make_figures(tables, {})["memory_timeline"].data]
    assert "had each graph been freed at its first backward" in names
    bars = {t.name: list(t.y) for t in figs["no_grad_retain"].data}
    assert bars["retained by retain_graph"] == [524_288]
    saved = figs["saved_memory"].data[0]
    assert set(saved.ids) >= {"activation", "parameter", "input", "activation/G.fc1/addmm"}


def test_unwritable_path_is_a_clear_error_and_loses_nothing(tmp_path):
    tables, meta = small_run()
    before = {k: v.copy() for k, v in tables.items()}
    bad = tmp_path / "missing-dir" / "r.html"
    with pytest.raises(OSError, match="missing-dir.*does not exist"):
        write_report(tables, meta, bad)
    with pytest.raises(ValueError, match="is a directory"):
        write_report(tables, meta, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written or temporary file left behind
    for k in tables:
        assert tables[k].equals(before[k])
    assert Path(write_report(tables, meta, tmp_path / "ok.html")).stat().st_size > 0


def test_long_tables_are_bounded(small_html, tmp_path):
    tables, meta = big_run(n_steps=50, n_params=10)  # 500 params rows
    text = Path(write_report(tables, meta, tmp_path / "r.html")).read_text()
    assert "500 rows, showing the first 200 and last 200" in text


def test_summary_html_for_jupyter():
    tables, meta = small_run()
    out = summary_html(tables, meta)
    assert "<script" not in out
    for f in FINDINGS:
        assert html.escape(f["message"]) in out
    assert out.index("error") < out.index("warning")


def test_perf_10k_steps_200_params(tmp_path):
    tables, meta = big_run(10_000, 200)
    assert len(tables["params"]) == 2_000_000
    t0 = time.perf_counter()
    path = write_report(tables, meta, tmp_path / "big.html")
    took = time.perf_counter() - t0
    mb = os.path.getsize(path) / 1e6
    print(f"\nreport of 10,000 steps x 200 params: {took:.2f} s, {mb:.1f} MB")
    assert took < 10, took
    assert mb < 15, mb
