"""Distributed rule: parameters DDP will find no gradient for, and what DDP does about them. Pure pandas.

Reads the `dist` table (present only in a run made inside a process group: rank, world_size, backend, and
one row per wrapper with DDP's flags) and the `params` table, whose statuses are already merged across
ranks (capture/dist.py: a parameter some rank used has the all-reduced `.grad`). One root cause, one finding:
when `no_gradient` already names these parameters, its row gets the DDP consequence appended; else a
`ddp_unused` finding is added.
"""

from __future__ import annotations

from ..text import is_missing
from .common import CAUSE_TEXT, listed

ERR_UNUSED = "Expected to have finished reduction in the prior iteration before starting a new one"
ERR_TWICE = "Expected to mark a variable ready only once"


def ddp_consequence(find_unused: bool | None, world_size: int | None) -> str:
    """What DDP does about parameters that get no gradient, by its find_unused_parameters flag."""
    if find_unused:
        ranks = f"any of the {world_size} ranks" if world_size else "any rank"
        return (f" No gradient on {ranks} (DDP all-reduced which parameters were used: none of the ranks used "
                "these). With find_unused_parameters=True DDP does not fail, but it traverses the autograd graph "
                "after every forward and all-reduces a used-parameter map for them; remove them from the model "
                "(or requires_grad_(False) before wrapping in DDP) and drop find_unused_parameters=True.")
    prefix = "" if find_unused is False else \
        "If DDP wraps this model with find_unused_parameters=False (the default), "
    return (f" {prefix}DDP's reducer waits for their gradients and never finishes the backward's reduction: "
            "the next iteration raises RuntimeError "
            f"\"{ERR_UNUSED}\". Fix: remove or freeze them (requires_grad_(False) before wrapping), or pass "
            "find_unused_parameters=True to DDP(...) when they are used only on some iterations or ranks.")


def distributed_findings(tables: dict, found: list | None = None) -> list[dict]:
    """Rows of the `findings` table for parameters left without a gradient under DDP (see module doc)."""
    dist = tables.get("dist")
    params = tables.get("params")
    if dist is None or dist.empty or params is None or params.empty or "wrapper" not in dist:
        return []
    ddp = dist[dist["wrapper"] == "ddp"]
    if ddp.empty:
        return []
    row = ddp.iloc[0]
    find_unused = bool(row["find_unused_parameters"]) if "find_unused_parameters" in ddp else None
    world = int(row["world_size"]) if "world_size" in ddp else None
    rank = int(row["rank"]) if "rank" in ddp else None
    text = ddp_consequence(find_unused, world)
    if not find_unused and rank is not None:
        text = f" On rank {rank}, with find_unused_parameters=False:" + text
    return unused_rows(tables, text, found)


def unused_rows(tables: dict, text: str, found: list | None = None, under: str = " under DDP",
                shown: int | None = 2) -> list[dict]:
    """`ddp_unused` rows for the parameters no backward of the run gave a gradient, one per cause and line, each
    ending with `text` (what DDP does about them); where a `no_gradient` row of `found` already names them, that
    row gets `text` instead (one finding per root cause). `shown`: names written out (None: all)."""
    params, backward = tables["params"], tables.get("backward")
    got = set(params.loc[params["status"].isin(["flow", "zero", "nonfinite"]), "param"].unique())
    none = params[(params["status"] == "none") & ~params["param"].isin(got)]
    rows: list[dict] = []
    for (cause, where), g in none.groupby(["cause", "site"], dropna=False, sort=False):
        names = list(g["param"].unique())
        where = None if is_missing(where) else where
        at = None  # the line of the backward(s) that left them without a gradient
        if backward is not None and not backward.empty:
            b = backward[backward["backward"].isin(g["backward"].unique())]["site"].dropna()
            at = b.iloc[0] if len(b) else None
        site = where or at
        same = [x for x in (found or []) if x.get("kind") == "no_gradient" and set(names) <= set(x.get("params") or [])]
        if same:
            same[0]["message"] += text
            same[0]["site"] = same[0].get("site") or site
            continue
        why = CAUSE_TEXT.get(None if is_missing(cause) else cause) or f"flow stopped by {cause} at {where}"
        rows.append({"kind": "ddp_unused", "severity": "error", "site": site, "step": int(g["step"].min()),
                     "params": names, "nbytes": None,
                     "message": f"{listed(names, shown or len(names))} got no gradient{under} ({why}; backward at "
                                f"{at})." + text})
    return rows
