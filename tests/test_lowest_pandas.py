"""Loaded runs are right on the lowest pandas (and pyarrow, plotly) that pyproject allows: a real run saved
here is loaded in the venv `make venv-lowest` builds (pandas 2.2.0, numpy 1.26, pyarrow 14, plotly 5.20, no
torch) and must read the same tables, summary and findings as the live probe, and write its report."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
import torch
from torch import nn

import gradprobe as gp
from tests.lowest_pandas import canonical

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOWEST = pathlib.Path(os.environ.get("GRADPROBE_LOWEST_PYTHON", ROOT / "build/venv-lowest/bin/python"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h) + self.aux(h.detach()) * 0


def _run():
    """Many kinds of cells: missing numbers and strings (off-detail steps), lists, a cut, saved memory,
    a leak (`total += loss`), an unused graph and findings."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    total = 0
    with gp.Probe(model, every=3) as probe:
        for i in range(7):
            loss = model(torch.randn(4, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total = total + loss
            if i == 3:
                model(torch.randn(2, 6))
    return probe


def _read_on_lowest(paths: list[str], report) -> dict:
    if not LOWEST.exists():
        pytest.skip(f"{LOWEST} missing: `make venv-lowest` builds it (pandas 2.2.0, pyarrow 14, plotly 5.20)")
    out = subprocess.run([str(LOWEST), str(ROOT / "tests/lowest_pandas.py"), ",".join(paths), str(report)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    low = json.loads(out.stdout)
    assert low["versions"]["pandas"].startswith("2.2.") and low["versions"]["plotly"].startswith("5.20")
    return low


def _same(low: dict, live: dict) -> None:
    assert set(low["tables"]) == set(live["tables"])
    for name, table in live["tables"].items():
        assert low["tables"][name]["columns"] == table["columns"], name
        assert low["tables"][name]["rows"] == json.loads(json.dumps(table["rows"], default=str)), name
    assert low["findings"] == json.loads(json.dumps(live["findings"], default=str))
    assert low["summary"] == live["summary"]


def test_a_saved_run_reads_the_same_on_the_lowest_allowed_pandas(tmp_path):
    probe = _run()
    path = probe.save(tmp_path / "run.gprobe")
    low = _read_on_lowest([path], tmp_path / "r.html")
    live = canonical(probe.to_pandas(), probe.summary(), probe.findings)
    _same(low, live)
    assert low["figures"] == sorted(probe.figures()) and low["report_bytes"] > 100_000


def test_rank_files_merge_the_same_on_the_lowest_allowed_pandas(tmp_path):
    """Merging concatenates ranks' tables: missing text must stay missing there too (pandas 2.2's
    astype("str") would write "None")."""
    paths = []
    for rank in (0, 1):
        probe = _run()
        probe.meta.update(rank=rank, world_size=2)  # as the capture sets them in a process group
        paths.append(probe.save(tmp_path / "run.gprobe"))
    low = _read_on_lowest(paths, tmp_path / "all.html")
    merged = gp.load(paths)
    _same(low, canonical(merged.to_pandas(), merged.summary(), merged.findings))
    causes = low["tables"]["params"]["rows"]
    assert "None" not in {row[low["tables"]["params"]["columns"].index("cause")] for row in causes}
