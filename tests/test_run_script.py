"""`gradprobe run SCRIPT [ARGS]` (issue 11 §5): a script run unchanged under Probe(None), like cProfile.

The GAN is tests/examples/dcgan_main.py, pytorch/examples' dcgan/main.py as a script (random images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gradprobe as gp
from gradprobe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DCGAN = ROOT / "tests" / "examples" / "dcgan_main.py"


def gradprobe_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gradprobe", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def line_of(path: Path, text: str) -> int:
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, (text, lines)
    return lines[0]


def at(site, path: Path, line: int) -> bool:
    """Whether `site` (FILE:LINE, the file relative or absolute) names that line of that file."""
    file, _, n = str(site).rpartition(":")
    return n == str(line) and os.path.exists(file) and os.path.samefile(file, path)


def test_dcgan_script_runs_unchanged_under_gradprobe_run(tmp_path):
    out = gradprobe_cli("run", "-o", "gan.gprobe", "--report", "gan.html", str(DCGAN),
                        "--iters", "2", "--outf", "ck", "--manualSeed", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iters=2" in out.stdout and "manualSeed=1" in out.stdout and "outf='ck'" in out.stdout  # its argv
    assert (tmp_path / "ck" / "netG_epoch_0.pth").exists()  # the script's own outputs, relative to the cwd
    assert (tmp_path / "gan.html").stat().st_size > 0 and "report written to gan.html" in out.stderr
    run = gp.load(tmp_path / "gan.gprobe")
    assert run.meta["script"] == str(DCGAN) and run.meta["script_args"] == [
        "--iters", "2", "--outf", "ck", "--manualSeed", "1"]
    assert run.meta["model"].startswith("None")
    t = run.to_pandas()
    bw, params = t["backward"], t["params"]
    g_step = bw.loc[bw["site"].map(lambda s: at(s, DCGAN, line_of(DCGAN, "errG.backward()"))), "backward"]
    assert len(g_step) == 2  # one generator step per iteration
    gen = params[params["param"].str.startswith("Generator.") & params["backward"].isin(g_step)]
    assert len(gen) == 2 * 13 and set(gen["status"]) == {"flow"}  # every Generator parameter trains there
    # the discriminator's step cuts `fake` with .detach(): found, effective, at the script's own line
    d_line = line_of(DCGAN, "output = netD(fake.detach())")
    cuts = t["cuts"]
    cut = cuts[(cuts["kind"] == "detach") & cuts["site"].map(lambda s: at(s, DCGAN, d_line))]
    assert len(cut) == 2 and cut["effective"].all()
    assert any(f.kind == "detach_cut" and at(f.site, DCGAN, d_line) for f in run.findings)
    d_fake = bw.loc[bw["site"].map(lambda s: at(s, DCGAN, line_of(DCGAN, "errD_fake.backward()"))), "backward"]
    none = params[params["param"].str.startswith("Generator.") & params["backward"].isin(d_fake)]
    assert set(none["status"]) == {"none"} and set(none["cause"]) == {"detach"}
    assert all(at(s, DCGAN, d_line) for s in none["site"])


PROBE_SCRIPT = """\
import json, sys
import torch
with open("seen.json", "w") as f:
    json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0]}, f)
model = torch.nn.Linear(3, 1)
model(torch.randn(4, 3)).sum().backward()
"""


def test_exit_status_argv_main_and_path_are_the_scripts(tmp_path):
    script = tmp_path / "job" / "train.py"
    script.parent.mkdir()
    script.write_text(PROBE_SCRIPT + "sys.exit(3)\n")
    out = gradprobe_cli("run", "-o", "r.gprobe", "--report", "r.html", str(script), "a", "--lr", "0.1", "-o", "x",
                        cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"argv": [str(script), "a", "--lr", "0.1", "-o", "x"], "name": "__main__",
                    "path0": str(script.parent)}
    run = gp.load(tmp_path / "r.gprobe")  # written although the script called sys.exit(3)
    assert (tmp_path / "r.html").exists() and len(run.to_pandas()["backward"]) == 1
    assert run.meta["script_args"] == ["a", "--lr", "0.1", "-o", "x"]
    assert "exited with status 3" in out.stderr


def test_an_exception_prints_the_scripts_traceback_exits_1_and_still_writes(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(PROBE_SCRIPT + "def fail():\n    raise RuntimeError('boom')\nfail()\n")
    out = gradprobe_cli("run", str(script), cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "RuntimeError: boom" in out.stderr
    assert f'File "{script}", line {line_of(script, "raise RuntimeError")}, in fail' in out.stderr and "runpy" not in out.stderr
    assert (tmp_path / "run.gprobe").exists() and (tmp_path / "gradprobe-report.html").exists()  # defaults
    assert len(gp.load(tmp_path / "run.gprobe").to_pandas()["params"]) > 0


def test_in_process_run_restores_argv_and_path_and_passes_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(PROBE_SCRIPT + "raise SystemExit('bad data')\n")
    argv, path = sys.argv[:], sys.path[:]
    main_module = sys.modules["__main__"]
    status = main(["run", "--every", "1", "--track", "grads,cuts", "-o", "t.gprobe", "--report", "t.html",
                   str(script), "--x", "1"])
    assert status == 1 and "bad data" in capsys.readouterr().err  # SystemExit(str): printed, status 1
    assert sys.argv == argv and sys.path == path and sys.modules["__main__"] is main_module
    run = gp.load(tmp_path / "t.gprobe")
    assert run.meta["track"] == ["grads", "cuts"] and run.meta["every"] == 1
    assert run.meta["command"] == f"gradprobe run {script} --x 1"


def test_bad_invocations_fail_in_one_line_before_running(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gradprobe run: error: no such script: {tmp_path / 'missing.py'}"
    script = tmp_path / "t.py"
    script.write_text("raise SystemExit('must not run')\n")
    assert main(["run", "--track", "grads,speed", str(script)]) == 2
    assert "unknown --track speed" in capsys.readouterr().err
    assert main(["run", "-o", str(tmp_path / "no" / "dir.gprobe"), str(script)]) == 2
    assert "does not exist" in capsys.readouterr().err


DDP_SCRIPT = """\
import torch, torch.distributed as dist
from torch import nn
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 4)
    def forward(self, x):
        h = torch.relu(self.a(x)).detach()
        if rank == 1:
            h = h + self.c(h)
        return self.b(h)
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(Net(), find_unused_parameters=True)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
dist.destroy_process_group()
"""


def test_torchrun_ranks_write_their_own_files_and_the_cli_merges_them(tmp_path):
    import socket

    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        import pytest
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port),
                          "-m", "gradprobe", "run", "ddp_train.py"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.rank*.*")) == [
        "gradprobe-report.rank0.html", "gradprobe-report.rank1.html", "run.rank0.gprobe", "run.rank1.gprobe"]
    assert main(["summary", str(tmp_path / "run.rank0.gprobe"), str(tmp_path / "run.rank1.gprobe")]) == 0
    run = gp.load([tmp_path / "run.rank0.gprobe", tmp_path / "run.rank1.gprobe"])
    assert run.meta["ranks"] == [0, 1] and run.meta["script_args"] == []
    p = run.to_pandas()["params"]
    assert set(p.loc[p["param"].str.startswith("Net.c."), "status"]) == {"flow"}  # DDP: used on rank 1
    cut = [f for f in run.findings if f.kind == "no_gradient"]
    assert len(cut) == 1 and cut[0].message.endswith("Seen on ranks 0 and 1.")
    assert cut[0].site == f"ddp_train.py:{line_of(script, '.detach()')}"  # relative to the job's directory
