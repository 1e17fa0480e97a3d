"""Shared test helpers: the expected `FILE:LINE` of a marked line in a test's own source."""

import inspect
import os

import pytest
import torch


def line_of(path: str, text: str, nth: int | None = None) -> int:
    """Line number of the line of `path` containing `text`: the only one, or the nth (from 1)."""
    with open(path) as f:
        lines = [i for i, line in enumerate(f, 1) if text in line]
    if nth is None:
        assert len(lines) == 1, f"{text!r} found on lines {lines} of {path}"
        nth = 1
    return lines[nth - 1]


def shown(path: str) -> str:
    """The path as a site names it: relative to the working directory when inside it."""
    return os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path


def site_of(marker: str, module_file: str | None = None) -> str:
    """`FILE:LINE` of the line in the calling test file that ends with `# marker`."""
    path = module_file or inspect.stack()[1].filename
    with open(path) as f:
        lines = [i for i, text in enumerate(f, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(lines) == 1, f"marker {marker!r} found on lines {lines}"
    return f"{shown(path)}:{lines[0]}"


def demo_site(name: str, text: str, nth: int | None = None) -> str:
    """`demos/NAME.py:LINE` of the demo line containing `text`."""
    path = f"demos/{name}.py"
    return f"{path}:{line_of(path, text, nth)}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def isolated():
    """A probe that leaks must fail its own test only: put the process back afterwards
    (use with `pytestmark = pytest.mark.usefixtures("isolated")`)."""
    from tests.clean import restore_installed, snapshot_installed
    import gradprobe as gp
    before = snapshot_installed()
    yield
    restore_installed(before)
    if hasattr(gp.Probe, "_active"):
        gp.Probe._active = None
