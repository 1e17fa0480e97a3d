"""Forward graphs no backward used: the `unused_graph` rule, and the lookup the cut rule shares. Pure pandas."""

from __future__ import annotations

import pandas as pd

from ..tables.counts import last_step
from ..text import human, span
from ..tables.graphs import unused_graphs
from .common import sampled_steps


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def cut_unused_graphs(tables: dict) -> dict:
    """(cut kind, cut site) -> the unused graphs (rows of unused_graphs) that an effective cut left unused:
    graphs of the cut's steps whose saved tensors came from the parameters it left without any gradient.
    A deliberate cut (those parameters got gradients from another backward, as in a GAN) is left out: its
    unused graph is plain waste that torch.no_grad() would save."""
    cuts, params = tables.get("cuts"), tables.get("params")
    if cuts is None or cuts.empty or params is None or params.empty or "upstream" not in cuts:
        return {}
    per = unused_graphs(tables)
    if per.empty:
        return {}
    got = set(params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    none = set(params.loc[params["status"] == "none", "param"].unique())
    eff = cuts[cuts["effective"].astype(bool) & (cuts["kind"] != "reentrant_checkpoint")]
    out = {}
    for key, g in eff.groupby(["kind", "site"], dropna=False, sort=False):
        cut_off = {p for ups in g["upstream"] for p in ups if p in none}
        if not cut_off or cut_off <= got:
            continue
        mods = {_module_of(p) for p in cut_off}
        near = pd.Series([bool(ps & cut_off) or bool(ms & mods) for ps, ms in zip(per["params"], per["modules"])],
                         index=per.index, dtype=bool)
        hit = per[per["step"].isin(set(g["step"])) & near]
        if len(hit):
            out[key] = hit
    return out


def cut_unused_text(hit: pd.DataFrame) -> str:
    """What a cut's finding says about the forward graphs it left unused."""
    n, each = len(hit), int(hit["act"].max())
    sites = ", ".join(dict.fromkeys(hit["site"].dropna().astype(str)))
    built = f"{n} graphs" if n > 1 else "a graph"
    total = f", {human(int(hit['act'].sum()))} over all {n}" if n > 1 else ""
    return (f" Because of this cut, the forward at {sites} built {built} that no backward used ({human(each)} "
            f"of activations each{total}); that is a consequence of the cut, not a reason to wrap the forward "
            "in torch.no_grad() (that would keep these parameters from ever training).")


def unused_graph(tables: dict, found: list[dict]) -> list[dict]:
    per = unused_graphs(tables)
    told = [gid for hit in cut_unused_graphs(tables).values() for gid in hit.index]
    if told:
        per = per[~per.index.isin(told)]  # told by the cut that left them unused: no no_grad advice
    rows = []
    for where, g in per.groupby(per["site"].astype(object).fillna("?"), sort=False):
        n = len(g)
        each = int(g["act"].max())
        times = f"{n} graphs" if n > 1 else "a graph"
        total = f" ({human(int(g['act'].sum()))} over all {n})" if n > 1 else ""
        msg = (f"The forward at {where} built {times} that no backward used (validation, metrics or logging "
               f"outside torch.no_grad()?), in {span(g['step'], 'step', last_step(tables))}{sampled_steps(tables)}: each saved "
               f"up to {human(each)} of activations for nothing{total}. Wrap it in `with torch.no_grad():` (or "
               "`torch.inference_mode()`) to save that memory and time.")
        rows.append({"kind": "unused_graph", "severity": "warning", "message": msg, "site": where,
                     "nbytes": each, "step": int(g["step"].min()), "params": []})
    return rows
