"""The capture layout: torch-free code never imports torch, and capture files stay small."""

import pathlib
import subprocess
import sys
import threading

import numpy
import pytest
import torch

import gradprobe as gp
from tests.models import MLP

ROOT = pathlib.Path(__file__).resolve().parents[1] / "gradprobe"
TORCH_FREE = ["gradprobe.text", "gradprobe.tables", "gradprobe.tables.schema", "gradprobe.tables.store",
              "gradprobe.tables.memory", "gradprobe.tables.causes", "gradprobe.tables.graphs", "gradprobe.tables.counts",
              "gradprobe.diagnose", "gradprobe.output", "gradprobe.output.run",
              "gradprobe.output.runfile", "gradprobe.output.merge", "gradprobe.output.summary", "gradprobe.output.report",
              "gradprobe.output.figures"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_tables_rules_figures_and_report_do_not_import_torch(module):
    """Imported with torch made unimportable: only capture/ (and the Probe that wires it) may need it."""
    code = (f"import sys, types, importlib.util\n"
            f"sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
            f"spec = importlib.util.spec_from_file_location('gradprobe', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}])\n"
            f"pkg = importlib.util.module_from_spec(spec); sys.modules['gradprobe'] = pkg\n"
            f"pkg.__path__ = [{str(ROOT)!r}]; pkg.__version__ = 'test'\n"
            f"import importlib; importlib.import_module({module!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_capture_files_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "capture").glob("*.py")}
    big = {k: v for k, v in sizes.items() if v > 330}
    assert not big, big
    assert len((ROOT / "probe.py").read_text().splitlines()) <= 200


def test_training_in_another_thread_is_recorded_and_said_plainly():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train():
        for _ in range(3):
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
            opt.zero_grad()

    with gp.Probe(model) as probe:
        worker = threading.Thread(target=train, name="trainer")
        worker.start()
        worker.join()
    t = probe.to_pandas()
    assert len(t["backward"]) == 3  # backwards and gradients there are recorded
    assert set(t["params"]["status"]) == {"flow"}
    limits = [f for f in probe.findings if f.kind == "probe_limit"]
    assert len(limits) == 1 and "thread trainer" in limits[0].message and "cuts" in limits[0].message


@pytest.mark.parametrize("kwargs, error, text", [
    ({"track": 42}, TypeError, "track must be a name or a list of names"),
    ({"track": ("grads", "bogus")}, ValueError, "unknown track ['bogus']"),
    ({"every": 0}, ValueError, "every must be a positive integer or None"),
    ({"every": 2.5}, ValueError, "every must be a positive integer or None"),
])
def test_bad_options_give_one_line_naming_the_fix(kwargs, error, text):
    with pytest.raises(error) as e:
        gp.Probe(MLP(), **kwargs)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_every_accepts_any_integral_number():
    probe = gp.Probe(MLP(), every=numpy.int64(10))
    assert probe.schedule.every == 10 and probe.meta["every"] == 10


def test_pytorch_warnings_keep_pointing_at_the_users_line():
    """softmax without dim warns inside the probe's __torch_function__: shown at the user's line."""
    code = ("import warnings, torch, gradprobe as gp\n"
            "m = torch.nn.Linear(3, 3)\n"
            "with gp.Probe(m, every=1):\n"
            "    x = m(torch.randn(2, 3))\n"
            "    y = torch.nn.functional.softmax(x)\n"  # line 5
            "    y.sum().backward()\n")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "<string>:5: UserWarning: Implicit dimension choice for softmax" in out.stderr, out.stderr
    assert "gradprobe" not in out.stderr


def test_torch_compile_first_used_inside_the_probe_leaves_nothing_installed():
    """torch._dynamo imported only inside the probe: its compile callback and the torch.compile wrap go on exit."""
    code = ("import sys, torch, gradprobe as gp\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "orig = torch.compile\n"
            "m = torch.nn.Linear(3, 3)\n"
            "with gp.Probe(m):\n"
            "    torch.compile(m, backend='eager')(torch.randn(2, 3)).sum().backward()\n"
            "from torch._dynamo import callback_handler\n"
            "print(len(callback_handler.start_callbacks), torch.compile is orig)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "True"]


def test_docs_api_columns_are_the_schema():
    """docs/API.md's column tables are what docs/make_api.py writes from gradprobe/tables/schema.py."""
    docs = ROOT.parent / "docs"
    out = subprocess.run([sys.executable, str(docs / "make_api.py")], capture_output=True, text=True, check=True)
    text = (docs / "API.md").read_text()
    inside = text.split("<!-- columns: begin -->")[1].split("<!-- columns: end -->")[0]
    assert inside.strip() == out.stdout.strip(), "run: python docs/make_api.py and paste it into docs/API.md"
