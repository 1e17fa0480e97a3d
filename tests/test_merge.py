"""One run from many ranks (issue 11 §3): per-rank files by default, merged by gp.load([...]) and the CLI.

Two probes in one process stand in for two ranks (their meta gets `rank`/`world_size` as the capture sets
them in a process group); the last test runs a real 2-process gloo DDP job that saves per-rank files by
default and merges them with `gradprobe report` / `gradprobe summary`.
"""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe as gp
from gradprobe.cli import main


class Net(nn.Module):
    """`a` is cut off by a detach on every rank; `c` runs on rank 1 only (after the cut, so it trains there)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)
        self.c = nn.Linear(4, 4)

    def forward(self, x, rank):
        h = torch.relu(self.a(x)).detach()  # cut
        if rank == 1:
            h = h + self.c(h)
        return self.b(h)


def train_rank(rank: int, steps: int = 3, world_size: int = 2):
    torch.manual_seed(rank)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.Probe(model)
    with probe:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 4), rank).sum().backward()
            opt.step()
    probe.meta.update(rank=rank, world_size=world_size, backend="gloo")  # what the capture writes under DDP
    return probe


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True, check_exact=True, obj=name)
        for col in a[name].columns[a[name].dtypes == object]:
            for x, y in zip(a[name][col], b[name][col]):
                assert type(x) is type(y), (name, col, x, y)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    probes = [train_rank(0), train_rank(1)]
    paths = [p.save(d / "run.gprobe") for p in probes]
    return d, probes, paths


def test_each_rank_writes_its_own_file_by_default(ranks, tmp_path):
    d, probes, paths = ranks
    assert paths == [str(d / "run.rank0.gprobe"), str(d / "run.rank1.gprobe")]
    assert probes[1].report(tmp_path / "report.html") == str(tmp_path / "report.rank1.html")
    assert (tmp_path / "report.rank1.html").stat().st_size > 0 and not (tmp_path / "report.html").exists()
    assert probes[1].save(tmp_path / "run.rank1.gprobe") == str(tmp_path / "run.rank1.gprobe")  # named already
    assert probes[0].save(tmp_path / "plain.gprobe", per_rank=False) == str(tmp_path / "plain.gprobe")
    single = train_rank(0, world_size=1)  # a world of one is not distributed
    assert single.save(tmp_path / "one.gprobe") == str(tmp_path / "one.gprobe")


def test_merged_run_has_a_rank_column_first_in_every_table(ranks):
    d, probes, paths = ranks
    run = gp.load([paths[1], paths[0]])  # any order: rows come rank by rank
    tables = run.to_pandas()
    assert set(tables) >= set(probes[0].to_pandas())
    for name, df in tables.items():
        assert list(df.columns)[0] == "rank" and str(df["rank"].dtype) == "int64", name
    for r, probe in enumerate(probes):
        own = probe.to_pandas()
        for name in ("params", "backward", "cuts", "saved", "modules", "steps"):
            got = tables[name][tables[name]["rank"] == r].drop(columns="rank").reset_index(drop=True)
            pd.testing.assert_frame_equal(got, own[name].reset_index(drop=True), check_exact=True, obj=name)
    assert sorted(tables["params"]["rank"].unique().tolist()) == [0, 1]
    assert run.meta["ranks"] == [0, 1] and run.meta["world_size"] == 2 and "rank" not in run.meta
    assert run.meta["sources"] == paths
    # `c` trains on rank 1 and is unused on rank 0
    p = tables["params"]
    assert set(p.loc[(p["rank"] == 1) & p["param"].str.startswith("c."), "status"]) == {"flow"}
    assert set(p.loc[(p["rank"] == 0) & p["param"].str.startswith("c."), "status"]) == {"none"}


def test_findings_are_aggregated_across_ranks(ranks):
    d, probes, paths = ranks
    run = gp.load(paths)
    f = run.to_pandas()["findings"]
    cut = f[(f["kind"] == "no_gradient") & f["message"].str.contains("detach")]
    assert len(cut) == 1, f["message"].tolist()  # the same root cause on both ranks: one finding
    row = cut.iloc[0]
    assert row["message"].endswith("Seen on ranks 0 and 1.") and row["ranks"] == [0, 1] and row["rank"] == 0
    assert sorted(row["params"]) == ["a.bias", "a.weight"]
    own = [x for x in probes[0].findings if x.kind == "no_gradient" and "detach" in x.message][0]
    assert row["message"] == f"{own.message} Seen on ranks 0 and 1." and row["site"] == own.site
    unused = [x for x in run.findings if "c.weight" in x.params]
    assert len(unused) == 1 and unused[0].message.endswith("Seen on rank 0.")
    n_single = len(probes[0].findings) + len(probes[1].findings)
    assert len(run.findings) < n_single


def test_merged_run_round_trips_exactly_and_is_summarized_per_rank(ranks, tmp_path):
    d, probes, paths = ranks
    run = gp.load(paths)
    back = gp.load(run.save(tmp_path / "all.gprobe"))
    _same(run.to_pandas(), back.to_pandas())
    assert back.meta == run.meta
    text = back.summary()
    assert text.startswith("gradprobe run: 2 ranks (0, 1); 3 steps, 3 backward calls on each rank")
    own = probes[0].summary().splitlines()[1]  # "Parameters by status ...: flow 2, ..., none 4, ..."
    assert own.split(": ", 1)[1] in text  # counts of one rank, never doubled
    assert "Parameters by status in their last backward, per rank:" in text
    assert "Seen on ranks 0 and 1." in text
    assert "2 ranks, 3 steps, 6 backwards" in repr(back) and "(merged from 2 files)" in repr(run)


def test_details_that_differ_between_ranks_are_said(tmp_path):
    probes = [train_rank(0, steps=3), train_rank(1, steps=4)]
    run = gp.load([p.save(tmp_path / "run.gprobe") for p in probes])
    cut = [x for x in run.findings if x.kind == "no_gradient" and "detach" in x.message]
    assert len(cut) == 1
    assert cut[0].message.endswith("Seen on ranks 0 and 1 (the details differ between ranks; shown: rank 0's).")


def test_runs_of_different_jobs_are_refused_in_one_line(ranks, tmp_path, capsys):
    d, probes, paths = ranks
    with pytest.raises(ValueError, match="both rank 0"):
        gp.load([paths[0], paths[0]])
    single = train_rank(0, world_size=1).save(tmp_path / "single.gprobe")
    with pytest.raises(ValueError, match="not one rank of a distributed run"):
        gp.load([paths[0], single])
    assert main(["summary", paths[0], single]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradprobe summary: error:") and "\n" not in err


def test_cli_merges_rank_files(ranks, capsys):
    d, probes, paths = ranks
    assert main(["report", *paths]) == 0
    html = (d / "run.html").read_text()  # default: run.rank*.gprobe -> run.html
    assert "Seen on ranks 0 and 1." in html and "2 runs, on ranks 0 and 1" in html
    capsys.readouterr()
    assert main(["summary", *paths]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gradprobe run: 2 ranks (0, 1)") and "Seen on rank 0." in out


# --- a real DDP job: 2 processes, gloo, 127.0.0.1 ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net(), find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = gp.Probe(model)
        with probe:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(8, 4), rank).sum().backward()
                opt.step()
        probe.save(os.path.join(out, "run.gprobe"))  # run.rank{rank}.gprobe
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_job_saves_rank_files_merged_by_the_cli(tmp_path, capsys):
    import torch.multiprocessing as mp

    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    files = sorted(str(p) for p in tmp_path.glob("run.rank*.gprobe"))
    assert [os.path.basename(f) for f in files] == ["run.rank0.gprobe", "run.rank1.gprobe"]
    assert not (tmp_path / "run.gprobe").exists()
    assert main(["report", *files, "-o", str(tmp_path / "all.html")]) == 0
    assert (tmp_path / "all.html").stat().st_size > 0
    run = gp.load(files)
    assert run.meta["ranks"] == [0, 1] and run.meta["backend"] == "gloo"
    p = run.to_pandas()["params"]
    assert list(p.columns)[0] == "rank" and sorted(p["rank"].unique().tolist()) == [0, 1]
    # DDP gives `c` the all-reduced gradient on rank 0 too: it trains on every rank
    assert set(p.loc[p["param"].str.startswith("c."), "status"]) == {"flow"}
    cut = [f for f in run.findings if f.kind == "no_gradient" and "detach" in f.message]
    assert len(cut) == 1 and cut[0].message.endswith("Seen on ranks 0 and 1."), [str(f) for f in run.findings]
    assert sorted(cut[0].params) == ["a.bias", "a.weight"]
    assert cut[0].site.endswith(f"test_merge.py:{_line('# cut')}")
    back = gp.load(run.save(tmp_path / "all.gprobe"))
    _same(run.to_pandas(), back.to_pandas())


def _line(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if text.rstrip().endswith(marker))


def test_figures_of_a_merged_run_draw_one_rank_and_say_which(ranks):
    """Per-backward panels and timelines never mix two ranks' rows: rank 0 is drawn, the title says so."""
    from gradprobe.output.figures import make_figures
    _, probes, paths = ranks
    merged = gp.load(paths)
    figs = make_figures(merged.to_pandas(), merged.meta)
    alone = make_figures(probes[0].to_pandas(), probes[0].meta)
    for name, fig in figs.items():
        assert "rank 0 of ranks 0, 1" in fig.layout.title.text, name
        ys = [str(t.to_plotly_json().get("y", t.to_plotly_json().get("values"))) for t in fig.data]  # NaN == NaN
        assert ys == [str(t.to_plotly_json().get("y", t.to_plotly_json().get("values"))) for t in alone[name].data], name
