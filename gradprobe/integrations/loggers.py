"""Per-step scalars and per-module gradient-norm histograms for TensorBoard, W&B and trainers' loggers.

Read from the probe's own records, incrementally: each call looks only at the rows added since the
last one (O(new rows), not O(run)), so calling it every step of a long loop stays cheap. Steps are
the probe's steps (one per optimizer step or cycle); a step is reported once it is complete.

Scalars (under `gradprobe/`):
- `params_without_grad`: trainable parameters that got no gradient in the step (exact on detail steps;
  off them, the smallest count over the step's backwards);
- `params_nonfinite`, `grad_norm_total` (the norm of every parameter's gradient after the step's last
  backward that reached it, as `clip_grad_norm_` computes it), `peak_live_saved_bytes`: detail steps only
  (the probe measures gradients and memory there); absent, never a made-up 0, elsewhere.
Histogram `gradprobe/module_grad_norm`: the gradient norm arriving at each module's output (detail steps).

No optional package is imported here: a sink is anything with `add_scalar`/`add_histogram`
(`torch.utils.tensorboard.SummaryWriter`) or with `log(dict)` (a `wandb` run).
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from ..tables.memory import Timeline

PREFIX = "gradprobe/"


class StepReader:
    """Completed steps of a probe not read yet, as (step, scalars, module grad norms)."""

    def __init__(self, probe) -> None:
        self._probe = weakref.ref(probe)  # log_to keeps readers per probe, weakly: never keep a probe alive
        self.last = -1  # last step returned
        self.rows: dict[int, int] = {}  # id(table's columns) -> first row that may hold a step after `last`

    @property
    def probe(self):
        return self._probe()

    def new(self, final: bool = False) -> list[tuple[int, dict, np.ndarray]]:
        """Steps completed since the last call; `final` (the probe is closed): the last step too."""
        if self.probe is None:
            return []
        cols = self.probe.store.cols
        steps = cols["steps"]["step"]
        done = set()
        for s in reversed(steps):  # newest first, down to `last`: a step is complete once its boundary row is in
            if s is None or s <= self.last:
                break
            done.add(s)
        if final:
            done.update(s for s in cols["backward"]["step"][-1:] if s is not None and s > self.last)
        if not done:
            return []
        upto = max(done)
        per = {t: self._rows(cols[t], upto) for t in ("backward", "params", "modules")}
        # detail steps: gradients measured (params rows); without "grads" tracked, wherever memory was
        detail = sorted(s for s in done if s in per["params"] or not self.probe.grads)
        peaks = self._peaks(detail) if self.probe.memory is not None else {}
        out = [(s, *_scalars(per, s, peaks.get(s))) for s in sorted(done)]
        self.last = upto
        return out

    def _rows(self, table: dict, upto: int) -> dict:
        """{step: {column: [values]}} for rows of steps in (last, upto]; advances this table's offset."""
        name = id(table)
        start = self.rows.get(name, 0)
        step = table["step"]
        n = len(step)
        by: dict = {}
        end = start
        for k in range(start, n):
            s = step[k]
            if s is None or s <= self.last:
                end = k + 1
                continue
            if s > upto:
                break
            by.setdefault(s, []).append(k)
            end = k + 1
        self.rows[name] = end
        return {s: {c: [v[k] for k in ks] for c, v in table.items()} for s, ks in by.items()}

    def _peaks(self, steps: list) -> dict:
        """Peak live saved-for-backward bytes of detail steps (the memory table's `live_saved_bytes`
        accounting and Timeline: bytes once per storage from its first save to its release), from the
        memory log's arrays: no table is built."""
        lg = getattr(self.probe.memory, "log", None)
        if not steps or lg is None or not len(lg.s_nbytes):
            return {}
        t0, t1 = _copy(lg.s_t0, np.float64), _copy(lg.s_t1, np.float64)
        nb, first = _copy(lg.s_nbytes, np.int64), _copy(lg.s_first, np.int64)
        of = _copy(lg.step, np.int64)[first]  # step of each storage's first save
        out = {}
        for s in steps:
            mine = of == s
            if not mine.any():
                continue
            a = t0[mine].min()
            ends = t1[mine]
            b = max(t0[mine].max(), ends[np.isfinite(ends)].max(initial=a))
            sel = (t1 > a) & (t0 <= b)  # storages live at some time in [a, b]
            out[s] = Timeline(t0[sel], t1[sel], nb[sel]).peak_in(a, b)
        return out


def _copy(buf, dtype) -> np.ndarray:
    """A numpy copy of an `array.array` the probe keeps appending to (a view would pin its buffer)."""
    return np.frombuffer(buf, dtype=dtype).copy() if len(buf) else np.zeros(0, dtype)


def _scalars(per: dict, s: int, peak) -> tuple[dict, np.ndarray]:
    out: dict = {}
    bw = per["backward"].get(s)
    params = per["params"].get(s)
    if params:
        got: dict = {}
        norms: dict = {}
        for name, status, norm in zip(params["param"], params["status"], params["grad_norm"]):
            got.setdefault(name, set()).add(status)
            if norm is not None and not (isinstance(norm, float) and math.isnan(norm)):
                norms[name] = norm  # the last backward's: the gradient the optimizer steps with
        st = {n: "nonfinite" if "nonfinite" in v else "flow" if v & {"flow", "zero"} else
              "frozen" if v == {"frozen"} else "none" for n, v in got.items()}
        values = list(st.values())
        out["params_without_grad"] = values.count("none")
        out["params_nonfinite"] = values.count("nonfinite")
        out["grad_norm_total"] = math.sqrt(sum(v * v for v in norms.values())) if norms else math.nan
    elif bw and any(v is not None for v in bw["params_none"]):
        out["params_without_grad"] = min(v for v in bw["params_none"] if v is not None)
    if peak is not None:
        out["peak_live_saved_bytes"] = peak
    hist = np.zeros(0)
    mods = per["modules"].get(s)
    if mods:
        last = {m: g for m, g in zip(mods["module"], mods["grad_norm"]) if g is not None and math.isfinite(g)}
        hist = np.asarray(list(last.values()), dtype=np.float64)
    return out, hist


_readers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # probe -> {id(sink): StepReader}


def log_to(probe, sink, *, prefix: str = PREFIX, histograms: bool = True) -> list[tuple[int, dict]]:
    """Write a live probe's completed steps not yet written to `sink`; returns [(step, scalars)] written.

    `sink`: a TensorBoard `SummaryWriter`-like object (`add_scalar(tag, value, step)`, and
    `add_histogram(tag, values, step)` for module norms) or a W&B run-like object (`log(dict)`;
    the probe's step goes in as `gradprobe/step`, W&B keeps its own step). A step is written once it
    is complete (the boundary is seen at the next step's first forward), the last one once the probe
    is closed. Cost: O(rows added since the last call); call it every step or at the end.
    """
    reader = _readers.setdefault(probe, {}).setdefault(id(sink), StepReader(probe))
    written = []
    for step, scalars, hist in reader.new(final=not getattr(probe, "depth", 0)):
        write(sink, step, scalars, hist if histograms else None, prefix=prefix)
        written.append((step, scalars))
    return written


def write(sink, step: int, scalars: dict, hist=None, *, prefix: str = PREFIX) -> None:
    """One step's scalars (and module-norm histogram, when it has values) to a TensorBoard or W&B sink."""
    finite = {f"{prefix}{k}": v for k, v in scalars.items() if v is not None and v == v}
    if hasattr(sink, "add_scalar"):
        for tag, v in finite.items():
            sink.add_scalar(tag, v, step)
        if hist is not None and len(hist) and hasattr(sink, "add_histogram"):
            sink.add_histogram(f"{prefix}module_grad_norm", hist, step)
    elif callable(getattr(sink, "log", None)):
        data = dict(finite)
        if hist is not None and len(hist):
            data[f"{prefix}module_grad_norm"] = _wandb_histogram(hist)
        if data:
            data[f"{prefix}step"] = step
            sink.log(data)
    else:
        raise TypeError(f"gradprobe: cannot log to {type(sink).__name__}; give a SummaryWriter-like object "
                        "(add_scalar/add_histogram) or a wandb run (log)")


def _wandb_histogram(values):
    try:
        import wandb  # optional: only when logging to W&B
        return wandb.Histogram(values)
    except Exception:
        return values.tolist()
