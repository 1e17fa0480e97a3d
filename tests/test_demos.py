"""The demos, end to end: their findings name the right parameters, causes and lines, and
their recorded runs survive save -> load exactly and render to a report."""

import importlib

import pandas as pd
import pytest

import gradprobe as gp
from gradprobe.tables.schema import TABLES
from tests.conftest import demo_site


def run_demo(name):
    return importlib.import_module(f"gradprobe_demos.{name}").main()


def test_gan_detach_is_listed_as_deliberate():
    probe = run_demo("gan")
    site = demo_site("gan", "D(fake.detach())")
    cut = [f for f in probe.findings if f.kind == "detach_cut"]
    assert len(cut) == 1 and cut[0].severity == "info" and cut[0].site == site
    assert cut[0].params == ["G.fc1.weight", "G.fc1.bias", "G.fc2.weight", "G.fc2.bias"]
    params = probe.to_pandas()["params"]
    d_step = params[(params["backward"] % 2 == 0)]
    assert set(d_step.loc[d_step["param"].str.startswith("G."), "cause"]) == {"detach"}
    assert set(params.loc[params["backward"] % 2 == 1, "status"]) == {"flow"}


def test_detached_output_error_names_the_detach_line():
    probe = run_demo("detached_output")
    first = probe.findings[0]
    assert first.kind == "backward_error" and first.severity == "error"
    assert f".detach() at {demo_site('detached_output', 'return x.detach()')}" in first.message
    assert first.site == demo_site("detached_output", "loss.backward()")


def test_multihead_names_frozen_unused_head_and_argmax():
    probe = run_demo("multihead")
    p = probe.to_pandas()["params"]
    last = p[p["backward"] == p["backward"].max()].set_index("param")
    assert set(last.index[last["status"] == "frozen"]) == {
        "backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"}
    assert last.loc["heads.aux.weight", "cause"] == "not_in_graph"
    assert last.loc["heads.router.weight", "cause"] == "non_differentiable"
    assert last.loc["heads.router.weight", "site"] == demo_site("multihead", ".argmax(dim=-1)")
    assert last.loc["experts.weight", "status"] == "flow"
    mods = probe.to_pandas()["modules"]
    mods = mods[mods["backward"] == mods["backward"].max()].set_index("module")
    assert mods.loc["heads", "status"] == "flow" and mods.loc["heads.aux", "status"] == "none"


@pytest.mark.parametrize("name", ["gan", "multihead", "detached_output"])
def test_demo_run_round_trips_and_reports(name, tmp_path):
    probe = run_demo(name)
    path = probe.save(tmp_path / f"{name}.gprobe")
    run = gp.load(path)
    before, after = probe.to_pandas(), run.to_pandas()
    assert set(TABLES) <= set(after)
    for table in before:
        pd.testing.assert_frame_equal(before[table], after[table], check_dtype=True)
    html = open(run.report(tmp_path / f"{name}.html")).read()
    for f in probe.findings:
        assert f.kind in html
    assert run.summary() == probe.summary()


@pytest.mark.parametrize("name", ["gan", "multihead", "detached_output", "retain_graph", "validation", "inplace"])
def test_every_text_value_is_in_its_vocabulary(name):
    """tables/schema.py's VALUES (what docs/API.md lists): a demo run never writes a value outside them."""
    from gradprobe.tables.schema import VALUES
    tables = run_demo(name).to_pandas()
    seen = 0
    for (table, column), allowed in VALUES.items():
        values = set(tables[table][column].dropna())
        assert values <= set(allowed), (table, column, values - set(allowed))
        seen += len(values)
    assert seen >= 3
