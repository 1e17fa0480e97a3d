"""Render the report in headless Chromium: every figure draws, no JavaScript error, offline.

Skipped where Chromium is not installed (`apt-get install chromium`); the offline HTML checks
in test_report.py run everywhere.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gradprobe.output.report import write_report

from synthetic import empty_run, small_run

FIGURES = ["flow_by_layer", "flow_over_time", "branches", "cuts", "saved_memory", "memory_timeline",
           "no_grad_retain"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed: apt-get install chromium to run the browser render check")


def _render(report: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", *extra, report.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _figure_chunks(dom: str) -> dict[str, str]:
    """The rendered DOM of each figure block, split at the blocks' ids."""
    starts = {name: dom.find(f'id="fig-{name}"') for name in FIGURES}
    assert all(v >= 0 for v in starts.values()), starts
    order = sorted(starts, key=starts.get)
    ends = [starts[n] for n in order[1:]] + [dom.find('<section id="tables">')]
    return {n: dom[starts[n]:e] for n, e in zip(order, ends)}


def _js_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Uncaught" in line or re.search(r"CONSOLE.*Error", line)]


@pytest.mark.parametrize("which", ["small", "empty"])
def test_every_figure_renders_without_js_errors(tmp_path, which):
    tables, meta = small_run() if which == "small" else empty_run()
    report = Path(write_report(tables, meta, tmp_path / "report.html"))
    r = _render(report, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for name, chunk in _figure_chunks(dom).items():
        assert 'class="main-svg"' in chunk, f"figure {name} did not render"
        assert "plot-container" in chunk, name
    assert _js_errors(r.stderr) == []
    if which == "small":
        assert 'class="treemap"' in dom or "treemaplayer" in dom  # the branch/memory treemaps drew


def test_screenshot(tmp_path):
    tables, meta = small_run()
    report = Path(write_report(tables, meta, tmp_path / "report.html"))
    png = tmp_path / "report.png"
    r = _render(report, tmp_path, f"--screenshot={png}", "--window-size=1400,3000")
    assert r.returncode == 0, r.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page is a few KB
    assert _js_errors(r.stderr) == []


def _marks(chunk: str) -> int:
    """Drawn data in a rendered figure: scatter points and lines, bars, heatmap cells, treemap slices."""
    return sum(chunk.count(k) for k in ('class="point"', 'class="js-line"', 'class="slice', 'class="hm"'))


@pytest.mark.parametrize("name", ["gan", "detached_output", "multihead", "retain_graph", "validation", "inplace"])
def test_every_demo_report_renders_without_console_errors_or_empty_plots(tmp_path, name):
    """Each demo trains for real; in its report every figure draws data, or says in words why it has none
    (a figure with neither is an empty plot)."""
    _chromium()
    import importlib

    probe = importlib.import_module(f"gradprobe_demos.{name}").main()
    report = Path(probe.report(tmp_path / "report.html"))
    r = _render(report, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _js_errors(r.stderr) == []
    for fig, chunk in _figure_chunks(r.stdout).items():
        assert 'class="main-svg"' in chunk, f"{name}: figure {fig} did not render"
        said = 'class="annotation"' in chunk and 'class="xtick"' not in chunk  # words, no axes around nothing
        assert _marks(chunk) > 0 or said, f"{name}: figure {fig} is an empty plot"
