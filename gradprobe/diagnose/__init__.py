"""Diagnosis: the run's tables in, one findings table out. Pure pandas, never touches torch.

A rule is a function `rule(tables, found) -> list[dict]` returning finding rows (the columns of the
`findings` table). It reads tables only and never writes into them; `found` holds the rows of the rules
before it, so a rule that completes an earlier root cause (the cut rule adds the graph a cut left unused
to that cut's `no_gradient` error) amends that row instead of adding a second finding, and a deliberate
cut's finding retires the info rows that were its consequence. RULES is the
registry, in order; one file per family: gradients, distributed, cuts, numerics, memory, leaks, unused, limits.
"""

from __future__ import annotations

import logging

import pandas as pd

from ..tables.schema import frame
from . import cuts, distributed, gradients, leaks, limits, memory, numerics, unused
from .finding import sort_findings

log = logging.getLogger("gradprobe")

RULES = (
    gradients.backward_errors, gradients.no_gradient, distributed.distributed_findings, cuts.cut_findings, numerics.nonfinite_grad,
    numerics.nonfinite_weights, numerics.amp_skipped, limits.probe_limits,
    memory.inplace_saved, memory.retain_graph, leaks.graph_leak, unused.unused_graph, limits.saved_hooks_shadowed,
)


def diagnose(tables: dict, rules=RULES) -> pd.DataFrame:
    """The findings of every rule, most severe first. A rule that fails is logged and skipped: one broken
    rule must not hide the others' findings."""
    found: list[dict] = []
    for rule in rules:
        try:
            found += rule(tables, found)
        except Exception as e:  # noqa: BLE001
            log.warning(f"gradprobe: rule {rule.__module__.rsplit('.', 1)[-1]}.{rule.__name__} failed: {e!r}")
    return sort_findings(frame("findings", found))
