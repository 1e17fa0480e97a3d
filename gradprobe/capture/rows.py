"""Per-backward records: params and modules rows, status counts, and the cause of every `none`.

A tracked tensor with no gradient is explained only by a cut its backward's roots depend on
(tags carried by the mode), or by one made earlier in the same step; else by whether its
module ran (`not_in_graph`) or not (`not_used`).
"""

from __future__ import annotations

import math

from ..tables.causes import cause_of
from ..tables.schema import STATUS
from .gradstats import rollup



def backward_rows(probe, bw, stats: dict, outs: dict) -> dict:
    """Append params/modules rows of a detail backward; return the status counts (zero/nonfinite None off detail)."""
    tracked = probe.targets.tracked
    indices = range(len(tracked)) if bw.considered is None else bw.considered
    arrived = dict.fromkeys(bw.arrived)
    live = []
    for i in indices:
        t = tracked[i]
        x = t.ref()
        if x is not None:
            live.append((i, t, x.requires_grad))
    if bw.detail:
        status = [stats[i][1] if i in stats else "none" if rg else "frozen" for i, t, rg in live]
    else:
        status = ["flow" if i in arrived else "none" if rg else "frozen" for i, t, rg in live]
    counts = {s: status.count(s) for s in STATUS}
    if not bw.detail:
        counts["zero"] = counts["nonfinite"] = None
        return counts
    none = [i for (i, t, rg), s in zip(live, status) if s == "none"]
    causes = explain(probe, bw, none)
    order = {i: k for k, i in enumerate(arrived)}
    no_cause = (None, None)
    probe.store.extend(
        "params", len(live), step=bw.step, backward=bw.index,
        param=[t.name for i, t, rg in live], module=[t.module for i, t, rg in live], status=status,
        cause=[causes.get(i, no_cause)[0] for i, t, rg in live],
        site=[causes.get(i, no_cause)[1] for i, t, rg in live],
        grad_norm=[stats[i][0] if i in stats else math.nan for i, t, rg in live],
        grad_maxabs=math.nan,
        arrival=[order.get(i, math.nan) for i, t, rg in live],
        numel=[t.numel for i, t, rg in live], kind=[t.kind for i, t, rg in live])
    module_rows(probe, bw, {i: s for (i, t, rg), s in zip(live, status)}, outs)
    return counts


# a detached tensor carries its cut's tag into every op it feeds; one that never went back into a graph (a
# sample detached for images, say) reached no loss, so it is not why a parameter got no gradient (tags can be
# lost in ops the mode does not see, like a framework's custom Function on the outputs: such a cut still explains)
_TAGGED = frozenset(("detach", "detach_", "data", "requires_grad_false"))


def explain(probe, bw, none: list[int]) -> dict:
    """index -> (cause, site) for tracked tensors that got no gradient in this backward."""
    if not none:
        return {}
    tracked = probe.targets.tracked
    cuts = probe.cutlog
    out = {}
    root_cuts = [cuts.cuts[c] for c in sorted(bw.root_tags)]
    ran = probe.modules.ran
    consumed = probe.mode.consumed if probe.mode is not None else ()
    for i in none:
        name = tracked[i].name
        for cut in root_cuts:
            if name in cut.upstream:
                _effective(cut, bw)
                out[i] = (cause_of(cut.kind), cut.site)
                break
        else:
            for cut in cuts.current:  # cuts made earlier in this step whose result carries no tag to a root
                if name in cut.upstream and (cut.kind not in _TAGGED or cut.id in consumed):
                    out[i] = (cause_of(cut.kind), cut.site)
                    if cut.kind == "reentrant_checkpoint":  # its output carries no tag: effective by name
                        _effective(cut, bw)
                    break
            else:
                module = tracked[i].module
                used = module is None or module in ran or any(m.startswith(module + ".") for m in ran)
                out[i] = ("not_in_graph" if used else "not_used", None)
    return out


def _effective(cut, bw) -> None:
    cut.effective = True
    if cut.backward is None:
        cut.backward = bw.index


def module_rows(probe, bw, status_by_index, outs) -> None:
    cols = {c: [] for c in ("module", "status", "grad_norm", "type", "parent", "depth", "order", "n_params",
                            "params_flow", "params_zero", "params_nonfinite", "params_none", "params_frozen")}
    for info in probe.targets.modules:
        statuses = [status_by_index[i] for i in info.params if i in status_by_index]
        if not statuses:
            continue  # no parameters (ReLU, ...), or none in this backward (autograd.grad on others)
        row = {"module": info.name, "status": rollup(statuses), "grad_norm": outs.get(info, math.nan),
               "type": info.type, "parent": info.parent, "depth": info.depth, "order": info.order,
               "n_params": info.n_params}
        for s in ("flow", "zero", "nonfinite", "none", "frozen"):
            row[f"params_{s}"] = statuses.count(s)
        for c, v in row.items():
            cols[c].append(v)
    probe.store.extend("modules", len(cols["module"]), step=bw.step, backward=bw.index, **cols)
