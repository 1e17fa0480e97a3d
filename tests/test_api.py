"""The public contract of ../shared/API.md: names, tables, minimum columns, and the README's example."""

import re
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import nn

import gradprobe as gp

API_COLUMNS = {
    "params": ["step", "backward", "param", "module", "status", "cause", "site", "grad_norm"],
    "modules": ["step", "backward", "module", "status", "grad_norm", "saved_bytes"],
    "cuts": ["step", "kind", "site", "module", "upstream", "effective"],
    "saved": ["step", "module", "op", "nbytes", "kind", "freed_by"],
    "backward": ["step", "backward", "site", "retain_graph", "saved_bytes", "retained_bytes"],
    "memory": ["t", "step", "event", "live_saved_bytes", "rss_bytes", "cuda_allocated_bytes"],
    "findings": ["kind", "severity", "message", "site", "nbytes", "step"],
}
ROOT = Path(__file__).resolve().parents[1]


def test_public_names_and_every_table_with_its_minimum_columns():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with gp.Probe(model) as probe:
        h = model[0](torch.randn(3, 4))
        model[2](torch.relu(h).detach()).sum().backward()
    tables = probe.to_pandas()
    for table, cols in API_COLUMNS.items():
        assert list(tables[table].columns[:len(cols)]) == cols, table
    assert all(isinstance(f, gp.Finding) for f in probe.findings) and probe.findings
    figs = probe.figures()
    assert figs and all(isinstance(f, go.Figure) for f in figs.values())
    assert callable(gp.load) and callable(gp.compare_no_grad)
    assert tables["params"]["status"].isin(["flow", "zero", "nonfinite", "none", "frozen"]).all()
    assert tables["cuts"]["kind"].tolist() == ["detach"]
    assert tables["saved"]["kind"].isin(["activation", "parameter", "input"]).all()


def test_readme_usage_example_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    use = readme[readme.index("## Use"):]
    code = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    model = nn.Linear(3, 1)
    namespace = {
        "model": model, "loss_fn": nn.functional.mse_loss,
        "loader": [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)],
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "report.html").exists() and (tmp_path / "run.gprobe").exists()
    assert namespace["tables"]["backward"]["step"].tolist() == [0, 1, 2]
