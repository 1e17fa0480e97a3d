"""Saving a run to one file and loading it back exactly; clear errors for bad files."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gradprobe
from gradprobe.output.run import Run, load
from gradprobe.output.runfile import RunFileError, save_run
from gradprobe.tables.schema import TABLES

from synthetic import FINDINGS, empty_run, small_run


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True, check_exact=True, obj=name)
        for col in a[name].columns[a[name].dtypes == object]:
            for x, y in zip(a[name][col], b[name][col]):
                assert type(x) is type(y), (name, col, x, y)  # lists come back as lists, not arrays


def test_round_trip_is_exact_for_every_table(tmp_path):
    tables, meta = small_run()
    for name, dtypes in TABLES.items():  # the synthetic run exercises every table and dtype
        assert list(tables[name].columns) == list(dtypes)
        assert len(tables[name]) > 0
    assert tables["params"]["site"].isna().any() and tables["backward"]["error"].isna().all()
    assert tables["modules"]["saved_bytes"].isna().any() and tables["cuts"]["backward"].isna().any()
    assert tables["findings"]["nbytes"].isna().any() and tables["findings"]["params"].map(len).eq(0).any()
    path = save_run(tables, meta, tmp_path / "run.gprobe")
    run = load(path)
    assert isinstance(run, Run)
    _assert_same(tables, run.to_pandas())
    assert run.meta == meta
    assert run.to_pandas()["cuts"]["upstream"][0] == ["D.aux.weight", "G.fc2.weight"]


def test_empty_tables_round_trip(tmp_path):
    tables, meta = empty_run()
    run = load(save_run(tables, meta, tmp_path / "empty.gprobe"))
    _assert_same(tables, run.to_pandas())


def test_extra_columns_and_tables_are_kept(tmp_path):
    tables, meta = small_run()
    tables["params"]["note"] = pd.Series(["x", None] * (len(tables["params"]) // 2), dtype="str")
    tables["cuts"]["tags"] = pd.Series([["a"], []] * (len(tables["cuts"]) // 2), dtype=object)
    tables["extra"] = pd.DataFrame({"a": [1, 2], "b": [0.5, np.nan]})
    run = load(save_run(tables, meta, tmp_path / "x.gprobe"))
    _assert_same(tables, run.to_pandas())


def test_file_is_one_zip_with_a_format_marker(tmp_path):
    tables, meta = small_run()
    path = save_run(tables, meta, tmp_path / "run.gprobe")
    with zipfile.ZipFile(path) as z:
        head = json.loads(z.read("meta.json"))
        names = z.namelist()
    assert head["format"] == "gradprobe-run" and head["version"] == 1
    assert sorted(names) == sorted(["meta.json"] + [f"tables/{t}.parquet" for t in TABLES])


def test_to_pandas_returns_copies(tmp_path):
    tables, meta = small_run()
    run = load(save_run(tables, meta, tmp_path / "run.gprobe"))
    got = run.to_pandas()
    got["params"].loc[0, "grad_norm"] = -1.0
    got["cuts"]["upstream"][0].append("changed")
    again = run.to_pandas()
    assert again["params"].loc[0, "grad_norm"] != -1.0
    assert "changed" not in again["cuts"]["upstream"][0]


def test_loaded_run_has_the_read_api(tmp_path):
    tables, meta = small_run()
    run = gradprobe.load(save_run(tables, meta, tmp_path / "run.gprobe"))
    assert [f.kind for f in run.findings][:2] == ["no_gradient", "nonfinite_grad"]
    assert len(run.findings) == len(FINDINGS)
    assert "flow_by_layer" in run.figures()
    out = Path(run.report(tmp_path / "r.html"))
    assert FINDINGS[0]["message"] in out.read_text()
    assert "no_gradient" in run.summary()
    assert "no_gradient" in run._repr_html_()


def _one_line(e: Exception, path) -> str:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load(tmp_path / "nope.gprobe")
    _one_line(e.value, tmp_path / "nope.gprobe")


def test_foreign_text_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n")
    with pytest.raises(RunFileError, match="not a gradprobe run file") as e:
        load(p)
    _one_line(e.value, p)
    assert isinstance(e.value, ValueError)


def test_zip_without_meta(tmp_path):
    p = tmp_path / "other.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "not a run")
    with pytest.raises(RunFileError, match="no meta.json") as e:
        load(p)
    _one_line(e.value, p)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_file(tmp_path, keep):
    tables, meta = small_run()
    path = Path(save_run(tables, meta, tmp_path / "run.gprobe"))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RunFileError, match="truncated or corrupt") as e:
        load(path)
    _one_line(e.value, path)


def test_corrupt_table_inside_a_valid_zip(tmp_path):
    tables, meta = small_run()
    src = Path(save_run(tables, meta, tmp_path / "run.gprobe"))
    bad = tmp_path / "bad.gprobe"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, b"garbage" if n == "tables/params.parquet" else zin.read(n))
    with pytest.raises(RunFileError, match="truncated or corrupt") as e:
        load(bad)
    _one_line(e.value, bad)


def test_newer_format_version(tmp_path):
    p = tmp_path / "future.gprobe"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("meta.json", json.dumps({"format": "gradprobe-run", "version": 99, "meta": {}}))
    with pytest.raises(RunFileError, match="newer gradprobe"):
        load(p)


def test_save_to_bad_path(tmp_path):
    tables, meta = small_run()
    with pytest.raises(OSError, match="no-such-dir"):
        save_run(tables, meta, tmp_path / "no-such-dir" / "run.gprobe")
    with pytest.raises(ValueError, match="is a directory"):
        save_run(tables, meta, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", [None, "junk", 3.5, [1], True])
def test_a_run_file_with_a_null_or_junk_version_is_one_clear_line(tmp_path, version):
    import json
    import zipfile
    tables, meta = small_run()
    good = save_run(tables, meta, tmp_path / "good.gprobe")
    with zipfile.ZipFile(good) as z:
        files = {n: z.read(n) for n in z.namelist()}
    head = json.loads(files["meta.json"])
    head["version"] = version
    files["meta.json"] = json.dumps(head).encode()
    bad = tmp_path / "bad.gprobe"
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(RunFileError) as e:
        load(bad)
    assert "no valid run format version" in str(e.value) and "\n" not in str(e.value)
