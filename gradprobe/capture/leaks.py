"""What keeps graphs of earlier steps alive, and the user's line that did it.

At a step's end the SavedLog says, in O(1) of the run's length, how many graphs of earlier steps
are alive. The cause, strongest first:
- carried: a forward root call was given a tensor of an earlier step's graph (an RNN hidden state
  not detached between batches): the line of that call;
- accumulation: an op outside the model joined graphs of two steps (`epoch_loss += loss`);
- create_graph: a `create_graph=True` backward went through it (its `.grad` carries a grad_fn);
- retain_graph: a `retain_graph=True` backward went through it and something keeps it;
- reference: something else holds it. The user's frames are searched for the variable that
  holds such a tensor (a list, a dict, a tuple, the tensor itself), and the line of its function
  that appends to it, stores into it or adds to it is named.
"""

from __future__ import annotations

import linecache
import re
import sys

import torch

from .sites import _first_user, _shown

_KEY = "gradprobe.graph"


def graph_of(t):
    """The probe's Graph record of the tensor's grad_fn, or None."""
    gf = t.grad_fn if isinstance(t, torch.Tensor) else None
    if gf is None:
        return None
    try:
        s = gf.metadata.get(_KEY)
    except Exception:
        return None
    return s.graph if s is not None else None


def older(t, step: int, step_seq) -> bool:
    """Does `t` come from a graph built before `step` (recorded, or built while nothing was recorded)?"""
    g = graph_of(t)
    if g is not None:
        return g.step < step
    gf = t.grad_fn if isinstance(t, torch.Tensor) else None
    if gf is None or step_seq is None:
        return False
    try:
        return type(gf).__name__ != "AccumulateGrad" and gf._sequence_nr() < step_seq
    except Exception:
        return False


def tensors_in(value, limit: int = 8):
    """Tensors directly in a value: itself, or the first and last few items of a list/tuple/dict."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        items = value if len(value) <= limit else list(value[:limit // 2]) + list(value[-(limit // 2):])
        out = []
        for v in items:
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                out += [x for x in v[:limit] if isinstance(x, torch.Tensor)]
        return out
    return []


def holder(leaked, frames: int = 3):
    """(variable name, kind of value, FILE:LINE) of a local of the user's innermost frames that holds
    a tensor of one of the `leaked` graphs; the line is the one that adds to it, or None."""
    f = _first_user(sys._getframe(1))
    for _ in range(frames):
        if f is None:
            return None
        with torch._C.DisableTorchFunction():
            for name, value in list(f.f_locals.items()):
                for t in tensors_in(value):
                    g = graph_of(t)
                    if g is not None and g.id in leaked:
                        return name, type(value).__name__, _adding_line(f.f_code, name) or _line(f)
        f = _first_user(f.f_back)
    return None


_lines: dict = {}


def _adding_line(code, name: str):
    """The first line of `code`'s function that appends to, stores into or adds to `name`."""
    key = (code, name)
    if key in _lines:
        return _lines[key]
    pat = re.compile(rf"(?<![\w.]){re.escape(name)}\s*(\.(append|extend|insert|add|update)\(|\[[^\]]*\]\s*=(?!=)|"
                     rf"\+=|=\s*{re.escape(name)}\s*\+)")
    found = None
    try:
        last = max((ln for _, _, ln in code.co_lines() if ln is not None), default=code.co_firstlineno)
        for n in range(code.co_firstlineno, last + 1):
            line = linecache.getline(code.co_filename, n).split("#")[0]
            if pat.search(line):
                shown = _shown(code.co_filename)
                found = f"{shown}:{n}" if shown else None
                break
    except Exception:
        found = None
    _lines[key] = found
    return found


def _line(f):
    shown = _shown(f.f_code.co_filename)
    return f"{shown}:{f.f_lineno}" if shown else None


def carried_in(tensors, step: int, step_seq) -> bool:
    """A forward root call given a tensor of an earlier step's graph (`tensors`: its arguments' tensors)."""
    return any(t.requires_grad and older(t, step, step_seq) for t in tensors)


def leak_row(lg, step: int, carry, cached: dict) -> dict:
    """The step_end columns for graphs of earlier steps still alive at the end of `step` ({} if none)."""
    found = lg.leaked(step)
    if found is None:
        return {}
    n, nodes, nbytes, oldest = found
    row = {"leaked_graphs": n, "leaked_nodes": nodes, "leaked_bytes": nbytes,
           "note": f"from step {oldest.step}" if oldest is not None else None}
    br = lg.bridge
    since = oldest.step if oldest is not None else step
    if carry is not None and carry[2] >= since:
        row.update(leak_site=carry[0], leak_cause="carried")
    elif br is not None and br[2] >= since:
        row.update(leak_site=br[0], leak_cause="accumulation")
    elif oldest is not None and oldest.created_by is not None:
        row.update(leak_site=oldest.created_by, leak_cause="create_graph")
    elif oldest is not None and oldest.retained_by is not None:
        row.update(leak_site=oldest.retained_by, leak_cause="retain_graph")
    else:
        key = oldest.site if oldest is not None else None
        h = cached.get(key)
        tries = cached.get(("tries", key), 0)
        if h is None and tries < 3:  # a few locals of the user's frames, a few times per leaking forward
            cached[("tries", key)] = tries + 1
            leaked = {g.id for g in lg.alive.values() if g.step < step - 1 or (g.step == step - 1 and g.live_bytes)}
            h = holder(leaked)
            if h is not None:
                cached[key] = h
        if h is not None and h[2] is not None:
            row.update(leak_site=h[2], leak_cause="reference",
                       note=f"{row['note']}; held by `{h[0]}` ({h[1]})")
        else:
            row.update(leak_site=key, leak_cause="reference")
    return row
