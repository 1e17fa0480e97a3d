"""The `gradprobe` command: report/summary of saved runs, demos, and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

from gradprobe.cli import main
from gradprobe.output.run import load
from gradprobe.output.runfile import save_run

from synthetic import FINDINGS, small_run

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gradprobe", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.fixture
def run_file(tmp_path):
    tables, meta = small_run()
    return Path(save_run(tables, meta, tmp_path / "run.gprobe"))


def test_report_writes_offline_html(run_file, tmp_path, capsys):
    out = tmp_path / "out.html"
    assert main(["report", str(run_file), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count(get_plotlyjs()) == 1 and FINDINGS[0]["message"] in text
    err = capsys.readouterr().err
    assert f"report written to {out}" in err  # progress on stderr, stdout stays clean


def test_report_default_output_next_to_run(run_file):
    assert main(["report", str(run_file)]) == 0
    assert run_file.with_suffix(".html").exists()


def test_summary_prints_findings(run_file, capsys):
    assert main(["summary", str(run_file)]) == 0
    out = capsys.readouterr().out
    for f in FINDINGS:
        assert f["message"] in out


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["summary", "--help"], ["demo", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: gradprobe" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: gradprobe" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "text", "bad_output"])
def test_bad_input_is_one_line_exit_2(case, run_file, tmp_path, capsys):
    if case == "missing":
        argv, name = ["summary", str(tmp_path / "nope.gprobe")], "nope.gprobe"
    elif case == "text":
        (tmp_path / "notes.txt").write_text("hello")
        argv, name = ["report", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "r.html")], "notes.txt"
    else:
        argv, name = ["report", str(run_file), "-o", str(tmp_path / "no-dir" / "r.html")], "no-dir"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and err[0].startswith("gradprobe ")


def test_python_dash_m_no_traceback(tmp_path):
    ok = _run_cli("--help")
    assert ok.returncode == 0 and "demo" in ok.stdout
    bad = _run_cli("summary", str(tmp_path / "missing.gprobe"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "missing.gprobe" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# --- demos: run once the gradprobe_demos package (the repo's demos/ directory) is importable ---

def test_demo_list_and_unknown_name(capsys):
    demos = pytest.importorskip("gradprobe_demos")
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    for name in demos.DEMOS:
        assert name in out
    assert main(["demo", "no-such-demo"]) == 2
    err = capsys.readouterr().err
    assert "unknown demo 'no-such-demo'" in err and demos.DEFAULT in err


def test_default_demo_writes_report_and_run(tmp_path, capsys):
    demos = pytest.importorskip("gradprobe_demos")
    out, run = tmp_path / "demo.html", tmp_path / "demo.gprobe"
    assert main(["demo", "-o", str(out), "--save", str(run)]) == 0
    text = out.read_text()
    assert text.count(get_plotlyjs()) == 1 and 'id="fig-flow_by_layer"' in text
    loaded = load(run)
    assert not loaded.to_pandas()["params"].empty
    assert f"running demo '{demos.DEFAULT}'" in capsys.readouterr().err
