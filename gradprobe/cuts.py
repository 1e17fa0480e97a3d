"""Places where a tensor that depended on trainable tensors left the graph.

A cut is aggregated per (step, kind, site, module, op): the same line cutting
every step is one row per step with a count. `upstream` is found by walking
grad_fn to the AccumulateGrad leaves, memoised in each node's metadata so that
a graph is walked at most once.
"""

from __future__ import annotations

_KEY = "gradprobe.upstream"


def cause_of(kind: str) -> str:
    """The `cause` a cut gives a parameter it starved (API.md): `.detach_()` is a detach."""
    return "detach" if kind == "detach_" else kind


_CAUSE_LABEL = {"detach": ".detach()", "data": ".data", "no_grad": "torch.no_grad()/inference_mode",
                "non_differentiable": "a non-differentiable op", "to_python": "a conversion to Python",
                "requires_grad_false": "requires_grad_(False)"}


def cut_label(kind: str, op: str | None) -> str:
    """How a user would write the cut: `.detach()`, `argmax()`, `.item()`..."""
    if kind == "non_differentiable" and op:
        return f"non-differentiable {op}()"
    if kind == "to_python" and op:
        return f".{op}()" if op in ("item", "tolist", "numpy") else f"{op}(tensor)"
    if kind == "no_grad" and op:
        return f"{op}() under torch.no_grad()/inference_mode"
    if kind == "detach_":
        return ".detach_()"
    return _CAUSE_LABEL.get(kind, kind)



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


def upstream_leaves(tensor, name_of) -> frozenset:
    """Names of the leaves requiring grad that `tensor` depends on."""
    if tensor.grad_fn is None:
        return frozenset((name_of(tensor),)) if tensor.requires_grad else frozenset()
    return _node_leaves(tensor.grad_fn, name_of)


def _node_leaves(root, name_of) -> frozenset:
    # iterative post-order walk with memo in node.metadata
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        meta = node.metadata
        if _KEY in meta:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if done:
            leaves = set()
            var = getattr(node, "variable", None)
            if var is not None:
                leaves.add(name_of(var))
            for c in children:
                leaves |= c.metadata.get(_KEY, frozenset())
            meta[_KEY] = frozenset(leaves)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if _KEY not in c.metadata)
    return root.metadata[_KEY]


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
