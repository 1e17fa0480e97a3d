"""Places where a tensor that depended on trainable tensors left the graph.

A cut is aggregated per (step, kind, site, module, op): the same line cutting
every step is one row per step with a count. `upstream` (the trainable leaves the
cut tensor depended on) comes from graph.upstream.
"""

from __future__ import annotations

from ..tables.causes import cut_label


class Cut:
    __slots__ = ("id", "step", "kind", "op", "site", "module", "upstream", "count", "effective", "backward")

    def __init__(self, id, step, kind, op, site, module):
        self.id, self.step, self.kind, self.op, self.site, self.module = id, step, kind, op, site, module
        self.upstream: set[str] = set()
        self.count = 0
        self.effective = False
        self.backward = None

    def row(self, order: dict) -> dict:
        return {"step": self.step, "kind": self.kind, "site": self.site, "module": self.module,
                "upstream": sorted(self.upstream, key=lambda n: (order.get(n, len(order)), n)), "effective": self.effective, "cut": self.id,
                "op": self.op, "count": self.count, "backward": self.backward}

    def describe(self) -> str:
        what = cut_label(self.kind, self.op)
        where = f" at {self.site}" if self.site else ""
        inside = f" (in {self.module})" if self.module else ""
        return f"{what}{where}{inside}"


class CutLog:
    """Cuts of the run, with the per-step index used to aggregate and to explain causes."""

    def __init__(self) -> None:
        self.cuts: list[Cut] = []
        self._index: dict[tuple, Cut] = {}
        self.current: list[Cut] = []  # cuts of the step under way, in order

    def record(self, step, kind, op, site, module, upstream) -> Cut:
        key = (step, kind, op, site, module)
        cut = self._index.get(key)
        if cut is None:
            cut = Cut(len(self.cuts), step, kind, op, site, module)
            self.cuts.append(cut)
            self._index[key] = cut
            self.current.append(cut)
        cut.count += 1
        cut.upstream |= upstream
        return cut

    def end_step(self) -> None:
        self._index.clear()
        self.current = []

    def merge(self, step: int) -> None:
        """Steps after `step` were part of it (the first iteration, learnt late): relabel."""
        for cut in self.cuts:
            if cut.step > step:
                cut.step = step
        self._index = {(step,) + k[1:]: c for k, c in self._index.items()}
        self.current = [c for c in self.cuts if c.step == step]
