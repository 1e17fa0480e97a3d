"""Output a user can trust (issue 10, sections 4 and 5), on real small training runs.

Memory headline per step (never a sum over steps), the memory timeline by step, source lines
beside sites, a Jupyter fragment that styles only itself, empty runs that say why, and the
small command-line and repr niceties.
"""

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.output.figures import make_figures
from gradprobe.output.report import message_html, table_html
from gradprobe.output.summary import memory_headline
from gradprobe.text import site_label, source_line

from conftest import site_of
from models import MLP

ROOT = Path(__file__).resolve().parents[1]
NUM = re.compile(r"\d+(?:[.,]\d+)*")


class Detached(nn.Module):
    """A head fed a detached trunk: the trunk gets no gradient from it (a real no_gradient finding)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.head(h.detach())  # POLISH-DETACH


def _train(model, steps=6, every=1, track=("grads", "cuts", "memory")):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = gp.Probe(model, every=every, track=track)
    with probe:
        for _ in range(steps):
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return probe


@pytest.fixture(scope="module")
def detached_run():
    torch.manual_seed(0)
    return _train(Detached(), steps=6, every=1)


# --- 1. memory headline ---------------------------------------------------------------------


def test_memory_headline_is_per_step_by_kind_never_a_sum_over_steps(detached_run):
    tables = detached_run.to_pandas()
    saved = tables["saved"]
    per_step = saved.groupby("step")["nbytes"].sum()
    assert per_step.nunique() == 1 and len(per_step) == 6  # every step saves the same bytes
    h = memory_headline(tables)
    assert h["sampled"] == 6 and h["steps"] == 6
    assert h["total"] == (float(per_step.median()), float(per_step.max()))
    by_kind = saved.groupby(["step", "kind"])["nbytes"].sum().unstack(fill_value=0)
    for kind, (med, mx) in h["by_kind"].items():
        assert (med, mx) == (float(by_kind[kind].median()), float(by_kind[kind].max())), kind
    assert "input" in h["by_kind"] and "activation" in h["by_kind"]
    assert h["peak"] == float(tables["memory"]["peak_saved_bytes"].max())
    assert h["peak"] < per_step.sum()  # one step's peak, not the run's sum
    text = detached_run.summary()
    assert "in 6 sampled steps of 6" in text and "peak live in one step" in text
    assert f"{int(per_step.sum()):,}" not in text and "Saved for backward:" not in text


def _numbers(text: str) -> list[str]:
    return NUM.findall(text)


def test_summary_report_and_reloaded_run_agree_on_every_count(detached_run, tmp_path):
    live = detached_run.summary()
    run = gp.load(detached_run.save(tmp_path / "r.gprobe"))
    assert run.summary() == live
    page = Path(detached_run.report(tmp_path / "r.html")).read_text(encoding="utf-8")
    pre = re.search(r'<section id="summary"><h2>Summary</h2><pre>(.*?)</pre>', page, re.S).group(1)
    assert _numbers(html.unescape(pre)) == _numbers(live)
    head = html.unescape(re.search(r'<pre class="memory-headline">(.*?)</pre>', page, re.S).group(1))
    assert head in live and _numbers(head)  # the report's headline is the summary's own lines
    reloaded = Path(run.report(tmp_path / "r2.html")).read_text(encoding="utf-8")
    pre2 = re.search(r'<section id="summary"><h2>Summary</h2><pre>(.*?)</pre>', reloaded, re.S).group(1)
    assert _numbers(html.unescape(pre2)) == _numbers(live)
    n = len(detached_run.findings)
    assert f"Findings ({n})" in page and f"Findings ({n})" in live and f"findings ({n})" in page
    assert f"{n} finding" in str(run)


# --- 2. memory timeline -----------------------------------------------------------------------


def test_memory_timeline_is_by_step_with_backwards_kinds_and_gaps():
    torch.manual_seed(0)
    probe = _train(MLP(), steps=12, every=5)
    tables = probe.to_pandas()
    detail = set(tables["saved"]["step"])
    assert detail == {0, 5, 10}
    fig = probe.figures()["memory_timeline"]
    traces = {t.name: t for t in fig.data}
    assert "step" in fig.layout.xaxis2.title.text
    assert {"live saved tensors", "freeable (activation + cast)", "parameters + buffers", "backward call"} <= set(traces)
    bw = traces["backward call"]
    assert sorted(int(np.floor(x)) for x in bw.x) == sorted(detail)  # one marker per recorded backward
    for name in ("live saved tensors", "parameters + buffers", "freeable (activation + cast)"):
        x = np.asarray(traces[name].x, dtype=float)
        y = np.asarray(traces[name].y, dtype=float)
        drawn = set(np.floor(x[~np.isnan(y)]).astype(int))
        assert drawn <= set(tables["memory"]["step"]), name  # nothing drawn on steps without a memory row
        assert not drawn & {1, 2, 3, 4, 6, 7, 8, 9}, name
        assert np.isnan(y).sum() >= 2, name  # gaps: the line breaks between 0 and 5, and 5 and 10
    params = np.asarray(traces["parameters + buffers"].y, dtype=float)
    free = np.asarray(traces["freeable (activation + cast)"].y, dtype=float)
    assert np.nanmax(params) == 96 and np.nanmax(free) == 708  # MLP: fc2.weight; relu/fc2/log_softmax outputs
    assert fig.layout.yaxis.rangemode == "tozero" and fig.layout.yaxis2.rangemode == "tozero"  # honest scales
    assert fig.layout.yaxis.tickformat == ".3~s"


def test_memory_panel_with_nothing_saved_says_so_in_words():
    w = nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    with gp.Probe({"m": nn.ParameterDict({"w": w})}, every=1) as probe:
        for _ in range(3):
            (w * 2).sum().backward()  # saves no tensor for backward
            opt.step()
            opt.zero_grad()
    fig = probe.figures()["memory_timeline"]
    texts = [a.text for a in fig.layout.annotations]
    assert any("No tensor was saved for backward" in t for t in texts), texts
    assert fig.layout.yaxis.showticklabels is False and tuple(fig.layout.yaxis.range) == (0, 1)


# --- 3. source lines -------------------------------------------------------------------------------


def test_source_line_beside_every_site(detached_run, tmp_path):
    site = site_of("POLISH-DETACH")
    src = "return self.head(h.detach())  # POLISH-DETACH"
    assert source_line(site) == src
    findings = detached_run.to_pandas()["findings"]
    assert (findings["site"] == site).any(), findings[["kind", "site"]]
    text = detached_run.summary()
    assert f"{site}: {src}" in text
    page = Path(detached_run.report(tmp_path / "r.html")).read_text(encoding="utf-8")
    assert f'<code class="src">{html.escape(src)}</code>' in page
    frag = detached_run._repr_html_()
    assert html.escape(src) in frag


def test_notebook_cells_are_named_as_cells():
    assert site_label("/tmp/ipykernel_123/456.py:7") == "notebook cell, line 7"
    assert site_label("train.py:3") == "train.py:3"
    assert source_line("no/such/file.py:3") is None and source_line("not a site") is None


# --- 4. Jupyter fragment, code in messages, plurals --------------------------------------------------


def test_repr_html_styles_only_its_own_root(detached_run):
    frag = detached_run._repr_html_()
    root = re.match(r'<div class="gradprobe (gradprobe-[\w-]+)">', frag)
    assert root, frag[:200]
    scope = root.group(1)
    css = re.search(r"<style>(.*?)</style>", frag, re.S).group(1)
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", css) for s in rule.split(",")]
    assert selectors and all(s == f".{scope}" or s.startswith(f".{scope} ") for s in selectors), selectors
    assert not [s for s in selectors if s.split()[0] in ("h1", "h2", "h3", "table", "pre", "body", "th", "td")]
    assert re.search(r"<code>[\w.]+</code>", frag)  # backticked parameter names rendered as code
    assert "`" not in re.sub(r"<pre>.*?</pre>", "", frag, flags=re.S)


def test_messages_render_backticks_as_code_and_escape_the_rest():
    assert message_html("use `a<b` here") == "use <code>a&lt;b</code> here"
    assert message_html("no code") == "no code"


def test_one_row_not_one_rows():
    one = table_html("x", pd.DataFrame({"a": [1]}))
    assert "1 row" in one and "1 rows" not in one
    assert "2 rows" in table_html("x", pd.DataFrame({"a": [1, 2]}))


# --- 5. empty runs, repr, command line, default report path ---------------------------------------------


def test_run_without_backward_says_what_was_not_recorded(tmp_path):
    model = MLP()
    with gp.Probe(model) as probe:
        model(torch.randn(2, 6))  # a forward, no backward
    text = probe.summary()
    assert "Nothing was recorded: no backward call ran" in text and "Findings: none." not in text
    with gp.Probe(model) as nothing:
        pass
    assert "Findings: none could be made, because nothing was recorded" in nothing.summary()
    page = Path(nothing.report(tmp_path / "n.html")).read_text(encoding="utf-8")
    assert "nothing looked wrong" not in page and "No findings could be made" in page
    page = Path(probe.report(tmp_path / "e.html")).read_text(encoding="utf-8")
    assert "nothing looked wrong" not in page and "no backward call ran" in page
    assert "nothing looked wrong" not in probe._repr_html_()


def test_training_in_spawned_processes_is_said_to_be_unseen():
    """`with probe: trainer.fit()` under Lightning's ddp_spawn trains in other processes: the run says where
    to put the probe instead of reporting nothing looked wrong."""
    import torch.multiprocessing as mp
    from tests.dist_workers import train_alone
    with gp.Probe(MLP()) as probe:
        mp.spawn(train_alone, nprocs=1, join=True)
    text = probe.summary()
    assert "no backward call ran" in text and "other processes" in text and "ddp_spawn" in text


def test_track_nothing_says_so():
    torch.manual_seed(0)
    probe = _train(MLP(), steps=2, track=())
    text = probe.summary()
    assert "track=() was given" in text
    assert "Findings: none." not in text or "Not tracked" in text or "nothing was tracked" in text


def test_track_without_memory_says_memory_was_not_tracked():
    torch.manual_seed(0)
    text = _train(MLP(), steps=2, track=("grads",)).summary()
    assert "Not tracked" in text and "saved tensors and memory" in text


def test_repr_and_str_are_short(detached_run, tmp_path):
    r = repr(detached_run)
    assert r.startswith("<gradprobe.Probe") and len(r) < 160 and "\n" not in r
    assert "6 backwards" in r
    run = gp.load(detached_run.save(tmp_path / "r.gprobe"))
    s = str(run)
    assert "\n" not in s and len(s) < 200 and "6 steps" in s and "6 backwards" in s
    assert repr(run).startswith("<gradprobe.Run")


def _cli_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_version_flag():
    p = subprocess.run([sys.executable, "-m", "gradprobe", "--version"], capture_output=True, text=True,
                       env=_cli_env(), cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"gradprobe {gp.__version__}"


def test_summary_into_a_closed_pipe_exits_0_quietly(detached_run, tmp_path):
    path = detached_run.save(tmp_path / "r.gprobe")
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written: like `| head -1` after its line
    try:
        p = subprocess.run([sys.executable, "-m", "gradprobe", "summary", path], stdout=w,
                           stderr=subprocess.PIPE, text=True, env=_cli_env(), cwd=ROOT, timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    shell = subprocess.run(f'"{sys.executable}" -m gradprobe summary "{path}" | head -1', shell=True,
                           capture_output=True, text=True, env=_cli_env(), cwd=ROOT, timeout=120)
    assert shell.returncode == 0 and shell.stderr == "" and shell.stdout.startswith("gradprobe run:")


def test_report_without_a_path_writes_default_file_and_says_where(detached_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = detached_run.report()
    assert out == "gradprobe-report.html" and (tmp_path / out).stat().st_size > 0
    assert str(tmp_path / out) in capsys.readouterr().err


def test_memory_figures_draw_leaks_and_unused_graphs_from_the_tables_not_the_findings():
    """A validation forward outside no_grad (an unused graph each step) and a list of losses (a leak): the
    no_grad figure's bar is the unused graphs' activation bytes, the timeline marks the leaking steps."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    with gp.Probe(model, every=1) as probe:
        for _ in range(4):
            loss = model(torch.randn(16, 6)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(loss)  # keeps every step's graph alive
            model(torch.randn(16, 6)).sum()  # validation outside no_grad: a graph no backward uses
    t = probe.to_pandas()
    figs = make_figures(t, probe.meta)
    unused = t["saved"][t["saved"]["backward"].isna() & (t["saved"]["freed_by"] != "alive")
                        & t["saved"]["kind"].isin(["activation", "cast"])]
    bars = {tr.name: list(tr.y) for tr in figs["no_grad_retain"].data}
    assert bars["forward graph no backward used"] == [int(unused["nbytes"].sum())] and len(unused)
    leaks = [tr for tr in figs["memory_timeline"].data if tr.name == "graphs of earlier steps alive"]
    ends = t["memory"][(t["memory"]["event"] == "step_end") & (t["memory"]["leaked_graphs"].fillna(0) > 0)]
    assert len(leaks) == 1 and len(ends) and list(leaks[0].x) == [s + 0.999 for s in ends["step"]]
    assert any(f.kind == "graph_leak" for f in probe.findings)


def test_the_deliberate_gan_detach_is_not_painted_as_an_error():
    """The cuts figure: a GAN's `D(fake.detach())` cuts G off in D's backward while G trains in its own, so
    it is drawn as deliberate (blue), not as a cut a backward needed (red)."""
    torch.manual_seed(0)
    G, D = nn.Linear(4, 6), nn.Linear(6, 1)
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    with gp.Probe({"G": G, "D": D}) as probe:
        for _ in range(3):
            fake = G(torch.randn(8, 4))
            opt_d.zero_grad()
            D(fake.detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-D(fake).mean()).backward()
            opt_g.step()
    bars = {t.name: list(t.x) for t in make_figures(probe.to_pandas(), probe.meta)["cuts"].data}
    assert bars == {"cut in one backward, trained by another (as in a GAN)": [3]}
