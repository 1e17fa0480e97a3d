"""The cut rule: a `.detach()`, `.data`, `no_grad` (...) that stopped gradient flow, with the forward
graph it left unused. A cut that left parameters without any gradient is told inside their
`no_gradient` error (one finding per root cause), which this rule amends; a deliberate cut (a GAN's
discriminator step) is one `info` finding, which retires the info `no_gradient` rows of its line.
Pure pandas."""

from __future__ import annotations

from ..tables.causes import cut_label
from ..tables.counts import last_step, sampled_of
from ..text import records, span
from .common import listed, module_label
from .unused import cut_unused_graphs, cut_unused_text


def cut_findings(tables: dict, found: list[dict]) -> list[dict]:
    params, cuts = tables["params"], tables["cuts"]
    rows: list[dict] = []
    if params.empty:
        return rows
    got = set(params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    none_params = set(params.loc[params["status"] == "none", "param"].unique())
    effective = cuts[cuts["effective"] & (cuts["kind"] != "reentrant_checkpoint")]  # told by no_gradient
    unused = cut_unused_graphs(tables) if len(effective) else {}  # forward graphs a cut left unused
    for (kind, where), g in effective.groupby(["kind", "site"], dropna=False, sort=False):
        r = records(g.head(1))[0]
        cut_off = list(dict.fromkeys(p for ups in g["upstream"] for p in ups if p in none_params))
        deliberate = all(p in got for p in cut_off)
        steps = sorted(set(g["step"]))
        hit = unused.get((kind, where))
        extra = cut_unused_text(hit) if hit is not None else ""
        nbytes = int(hit["act"].max()) if hit is not None else None
        if not deliberate:
            # one finding per root cause: the no_gradient error at this line already names the cut and the
            # parameters; it takes the advice and the graph the cut left unused instead of a second finding
            same = [x for x in found if x["kind"] == "no_gradient" and x["severity"] == "error"
                    and x["site"] == where and set(cut_off) <= set(x["params"])]
            if same:
                same[0]["message"] += " Nothing else gave them a gradient: if they should train, remove the cut." + extra
                same[0]["nbytes"] = nbytes
                continue
        else:
            # a deliberate cut (a GAN's discriminator step) is this one info finding: the info no_gradient rows
            # of the same line are its consequence, not a second root cause
            found[:] = [x for x in found if not (x["kind"] == "no_gradient" and x["severity"] == "info"
                                                 and x["site"] == where and set(x["params"]) <= set(cut_off))]
        rows.append({"kind": "detach_cut", "severity": "info" if deliberate else "warning",
                     "site": r["site"], "step": steps[0], "params": cut_off, "nbytes": nbytes,
                     "message": f"{cut_label(kind, r['op'])} at {r['site']}{module_label(tables, r['module'])}"
                                f" stopped gradient flow to "
                                f"{listed(cut_off, 2)} in {span(steps, 'step', last_step(tables), sampled_of(tables))}."
                                + (" Those parameters got gradients from another backward, as in a GAN's "
                                   "discriminator step: fine if intended." if deliberate else
                                   " Nothing else gave them a gradient: if they should train, remove the cut.")
                                + extra})
    return rows
