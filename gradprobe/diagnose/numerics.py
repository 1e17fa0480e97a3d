"""Where the first NaN/Inf came from: the `numerics` table joined into the `nonfinite_grad` finding.

Pure pandas, never touches torch. The capture re-ran the step after the first non-finite gradient
with per-op finiteness checks (capture/numerics.py); this rule names the first forward op (or,
when forward stayed finite, the first backward node) that produced NaN/Inf, its module and the
user's `file:line`, and says whether the parameters themselves were non-finite. GradScaler's
skipped steps are not touched: they give no `nonfinite_grad` (amp_skipped_step stays info).
"""

from __future__ import annotations

from ..tables.counts import last_step
from ..text import is_missing, records, span
from .common import amp_skipped_steps, listed


def _first(numerics, skipped: set):
    if numerics is None or numerics.empty:
        return None
    rows = numerics[~numerics["step"].isin(skipped)] if skipped else numerics
    if rows.empty:
        return None
    first_step = rows["step"].min()
    rows = rows[rows["step"] == first_step]
    fwd = rows[rows["phase"] == "forward"]
    return records((fwd if not fwd.empty else rows).head(1))[0]


def _module_type(tables: dict, module) -> str | None:
    mods = tables.get("modules")
    if is_missing(module) or mods is None or mods.empty or "type" not in mods:
        return None
    types = mods.loc[mods["module"] == module, "type"].dropna()
    return types.iloc[0] if len(types) else None


def origin_text(tables: dict, r: dict) -> str:
    module = r.get("module")
    kind = r.get("type") if not is_missing(r.get("type")) else _module_type(tables, module)
    name = f"`{module}`" + (f" ({kind})" if kind else "") if not is_missing(module) and module else (
        "the model" if module == "" else "outside any tracked module")
    what = "NaN" if r.get("what") == "nan" else "Inf"
    op = r.get("op")
    at = f" at {r['site']}" if not is_missing(r.get("site")) else ""
    if r.get("phase") == "backward":
        head = (f"first non-finite value: backward of `{op}` in {name}{at} in step {r['step']} (forward was "
                f"finite; its gradient turned {what} there)")
    else:
        head = f"first non-finite value: forward output of `{op}` in {name}{at} in step {r['step']} ({what})"
        if r.get("inputs") == "nonfinite":
            head += ", from inputs that were already NaN/Inf"
    return head


def _with_origin(tables: dict, rows: list[dict]) -> list[dict]:
    """Rows with the `nonfinite_grad` finding told where the first NaN/Inf came from."""
    bad = [r for r in rows if r.get("kind") == "nonfinite_grad"]
    if not bad:
        return rows
    steps = tables.get("steps")
    skipped = set(steps.loc[steps["amp_skipped"], "step"]) if steps is not None and not steps.empty else set()
    first = _first(tables.get("numerics"), skipped)
    weights = tables.get("weights")
    bad_weights = [] if weights is None or weights.empty else list(dict.fromkeys(weights["param"]))
    out = []
    for r in rows:
        if r.get("kind") != "nonfinite_grad":
            out.append(r)
            continue
        r = dict(r)
        extra = ""
        if first is not None:
            text = origin_text(tables, first)
            # the generic hint is superseded by the origin found
            r["message"] = r["message"].replace("; the layers nearest the loss get gradients first, so look there.",
                                                ".")
            extra += " " + text[0].upper() + text[1:] + ", found by re-checking the next iteration op by op."
            if is_missing(r.get("site")) and not is_missing(first.get("site")):
                r["site"] = first["site"]
        else:
            extra += (" Where it first appeared was not found (the step after it was re-captured with per-op "
                      "checks only if training went on).")
        if bad_weights:
            shown = ", ".join(f"`{p}`" for p in bad_weights[:2]) + (
                f" and {len(bad_weights) - 2} more" if len(bad_weights) > 2 else "")
            extra += f" Parameters were non-finite themselves: {shown} (see nonfinite_weights)."
        else:
            extra += " The parameters themselves were still finite when checked."
        r["message"] = r["message"] + extra
        out.append(r)
    return out


def nonfinite_grad(tables: dict, found: list[dict]) -> list[dict]:
    """The first NaN/Inf gradient, told where it first appeared (the numerics table) when that was found."""
    params = tables["params"]
    if params.empty:
        return []
    rows: list[dict] = []
    bad = params[(params["status"] == "nonfinite") & ~params["step"].isin(amp_skipped_steps(tables))]
    if not bad.empty:
        first = bad.sort_values(["backward", "arrival"]).iloc[0]
        n = bad.loc[bad["backward"] == first["backward"], "param"].nunique()
        rows.append({"kind": "nonfinite_grad", "severity": "error", "site": None, "step": int(first["step"]),
                     "params": [first["param"]],
                     "message": f"NaN/Inf gradient first appeared at `{first['param']}` in backward "
                                f"{first['backward']} (step {first['step']}), {n} parameter(s) affected; "
                                f"the layers nearest the loss get gradients first, so look there."})
    return _with_origin(tables, rows)


def nonfinite_weights(tables: dict, found: list[dict]) -> list[dict]:
    """Parameters that an optimizer step made NaN/Inf: training cannot recover from that."""
    weights = tables.get("weights")
    if weights is None or weights.empty:
        return []
    first = int(weights["step"].min())
    names = list(dict.fromkeys(weights.sort_values("step")["param"]))
    return [{"kind": "nonfinite_weights", "severity": "error", "site": None, "step": first, "params": names,
             "message": f"{listed(names, 2)} were NaN/Inf themselves by step {first} (checked when a sampled "
                        "backward found non-finite gradients): an optimizer step before it wrote them, and every "
                        "forward since computes NaN. Look at the learning rate and the gradients of the steps "
                        "before, and clip them (`clip_grad_norm_`)."}]


def amp_skipped(tables: dict, found: list[dict]) -> list[dict]:
    """GradScaler's own overflow steps: expected with AMP, info (the scale is lowered and the step skipped)."""
    steps = tables.get("steps")
    if steps is None or steps.empty:
        return []
    hit = steps[steps["amp_skipped"]]
    if hit.empty:
        return []
    scale = hit["grad_scale"].dropna()
    after = f"; the scale is now {scale.iloc[-1]:g}" if len(scale) else ""
    return [{"kind": "amp_skipped_step", "severity": "info", "site": None, "step": int(hit["step"].min()),
             "params": [],
             "message": f"GradScaler skipped {span(hit['step'], 'step', last_step(tables))}: it found inf/NaN gradients, lowered the "
                        f"scale and did not call optimizer.step(){after}. This is how AMP finds its scale; a few "
                        "skips are normal, a skip every step means the loss or the model overflows."}]
