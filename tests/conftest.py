"""Shared test helpers: the expected `FILE:LINE` of a marked line in a test's own source."""

import inspect
import os

import pytest
import torch


def site_of(marker: str, module_file: str | None = None) -> str:
    """`FILE:LINE` of the line in the calling test file that contains `marker`."""
    path = module_file or inspect.stack()[1].filename
    with open(path) as f:
        lines = [i for i, text in enumerate(f, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(lines) == 1, f"marker {marker!r} found on lines {lines}"
    shown = os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path
    return f"{shown}:{lines[0]}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
