"""What torch.no_grad() saves: the same forward with grad, under no_grad and under inference_mode.

Per mode, three separate kinds of run:

- one forward under saved-tensor hooks that sort what autograd saved, counted once per
  storage (a view keeps its whole storage): parameters and buffers (`param_bytes`), the
  inputs (`input_bytes`), autocast's dtype copies of parameters (`cast_bytes`) and
  everything else (`activation_bytes`). Parameters, buffers and inputs exist without the
  graph, so what torch.no_grad() saves is the activation and cast bytes only;
- one forward whose memory is measured: the CUDA allocator on CUDA (peak counter reset
  for it, as torch.cuda.reset_peak_memory_stats does), else the memory events of the CPU
  profiler (`torch.profiler`, profile_memory=True; one session, a record_function span per
  mode; none when another profiler is running). `peak_bytes` is the highest allocated
  total above the start during the forward, `held_bytes` what is still allocated when it
  returns (the output and what the graph keeps); `peak_source` names the source;
- `repeat` timed forwards with no hooks and no profiler.
"""

from __future__ import annotations

import statistics
import time

import pandas as pd
import torch

from .capture.procmem import rss
from .text import human, human_bytes

MODES = ("grad", "no_grad", "inference_mode")
KINDS = ("param", "input", "activation", "cast")
_MARK = "gradprobe.compare_no_grad."


def _ctx(mode):
    return {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]()


def _on_cuda(fn, inputs) -> bool:
    if not torch.cuda.is_available():
        return False
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
        return True
    if isinstance(fn, torch.nn.Module):
        return any(p.is_cuda for p in fn.parameters())
    return False


def _key(t):
    return (t.untyped_storage().data_ptr(), t.device)


def _keys(objs) -> set:
    """Storage keys of the tensors in `objs`, looking inside lists, tuples, sets and dicts."""
    out, stack = set(), list(objs)
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            try:
                out.add(_key(o))
            except Exception:  # sparse and other storage-less tensors
                pass
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
    return out


class _Counter:
    """Saved-tensor hooks that sort the bytes autograd saved, once per storage, by kind."""

    def __init__(self, params: set, inputs: set):
        self.params, self.inputs = params, inputs
        self.seen: set = set()
        self.bytes = dict.fromkeys(KINDS, 0)

    def pack(self, t):
        try:
            nb, key = t.untyped_storage().nbytes(), _key(t)
            if nb and key not in self.seen:
                self.seen.add(key)
                self.bytes[self._kind(t, key)] += nb
        except Exception:
            pass
        return t.detach()  # keeps the storage alive, so no later tensor reuses its address

    @staticmethod
    def unpack(t):
        return t

    def _kind(self, t, key) -> str:
        if key in self.params:
            return "param"
        if key in self.inputs:
            return "input"
        base = t._base if t._is_view() and t._base is not None else t
        if base.is_leaf:  # a leaf wanting a gradient exists before the forward; one made in it does not
            if base.requires_grad:
                return "param" if isinstance(base, torch.nn.Parameter) else "input"
            return "activation"
        gf = base.grad_fn
        if type(gf).__name__ == "ToCopyBackward0":  # autocast's weight cast: a dtype copy of a parameter
            nxt = gf.next_functions
            var = getattr(nxt[0][0], "variable", None) if nxt and nxt[0][0] is not None else None
            if var is not None and (isinstance(var, torch.nn.Parameter) or _keys([var]) <= self.params):
                return "cast"
        return "activation"


def _measure(run, cuda) -> dict:
    """mode -> (peak, held, source): allocated bytes above the start during one forward and after it."""
    if cuda:
        out = {}
        for mode in MODES:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            y = run(mode)
            torch.cuda.synchronize()
            out[mode] = (torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base,
                         "cuda_allocator")
            del y
        return out
    try:
        if torch.autograd._profiler_enabled():  # starting a second one would stop the user's
            return dict.fromkeys(MODES, (None, None, "none (another profiler is running)"))
        from torch.profiler import ProfilerActivity, profile, record_function
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    except Exception as e:
        return dict.fromkeys(MODES, (None, None, f"none (CPU profiler unavailable: {type(e).__name__})"))
    try:  # one profiler session for all modes (each start prints Kineto's log lines); a span marks each
        for mode in MODES:
            with record_function(_MARK + mode):
                y = run(mode)
            del y
    finally:
        prof.stop()
    try:
        events = list(prof.profiler.kineto_results.events())
        spans = {e.name()[len(_MARK):]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith(_MARK)}
        mem = [e for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        mem.sort(key=lambda e: e.start_ns())  # stable: ties keep the order they were recorded in
        out = {}
        for mode in MODES:
            lo, hi = spans[mode]
            total = peak = 0
            for e in mem:
                if lo <= e.start_ns() <= hi:
                    total += e.nbytes()
                    peak = max(peak, total)
            out[mode] = (peak, total, "cpu_profiler")
        return out
    except Exception as e:
        return dict.fromkeys(MODES, (None, None, f"none (CPU profiler events unreadable: {type(e).__name__})"))


class Comparison:
    """Result of compare_no_grad: `.to_pandas()`, `.figure()`, `str()`, and HTML in notebooks."""

    def __init__(self, rows: list[dict], device: str):
        self.rows = rows
        self.device = device

    def to_pandas(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        types = {c: "int64" for c in ("saved_bytes", "param_bytes", "input_bytes", "activation_bytes", "cast_bytes")}
        types.update({c: "Int64" for c in ("peak_bytes", "held_bytes", "rss_delta_bytes")})
        return df.astype({c: t for c, t in types.items() if c in df})

    def __str__(self) -> str:
        df = self.to_pandas()
        base = df.set_index("mode")
        lines = [f"torch.no_grad() comparison on {self.device} ({int(df['repeat'].iloc[0])} timed runs per mode; "
                 f"memory measured by {df['peak_source'].iloc[0]})",
                 f"{'mode':<16}{'saved':>12}{'params':>12}{'inputs':>12}{'activations':>13}{'casts':>12}"
                 f"{'peak':>12}{'held after':>12}{'time (median)':>16}"]
        for r in df.itertuples():
            lines.append(f"{r.mode:<16}{_size(r.saved_bytes):>12}{_size(r.param_bytes):>12}"
                         f"{_size(r.input_bytes):>12}{_size(r.activation_bytes):>13}{_size(r.cast_bytes):>12}"
                         f"{_size(r.peak_bytes):>12}{_size(r.held_bytes):>12}{r.time_s * 1000:>13.3f} ms")
        g, n = base.loc["grad"], base.loc["no_grad"]
        what = "saved activations and autocast weight copies" if g["cast_bytes"] else "saved activations"
        lines.append(f"torch.no_grad() saves {human(_saving(g, n))} per forward: the {what}. "
                     f"The {human(g['param_bytes'])} of parameters and buffers and {human(g['input_bytes'])} of "
                     f"inputs also saved for backward exist without the graph.")
        lines.append(f"Time: torch.no_grad() {_faster(n['time_s'], g['time_s'])}.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        df = self.to_pandas()
        return (f"<p>torch.no_grad() comparison on {self.device}</p>" +
                df.to_html(index=False, float_format=lambda v: f"{v:.6g}"))

    def figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
        df = self.to_pandas()
        fig = make_subplots(rows=1, cols=2, subplot_titles=["memory (bytes)", "time per forward (s)"])
        freed = df["activation_bytes"] + df["cast_bytes"]
        for y, name, color in ((df["saved_bytes"], "saved for backward", "#457b9d"),
                               (freed, "of it activations and casts", "#a8dadc"),
                               (df["peak_bytes"].astype("float64"), f"peak ({df['peak_source'][0]})", "#e76f51")):
            fig.add_trace(go.Bar(x=df["mode"], y=y, name=name, marker_color=color,
                                 hovertext=[_size(v) for v in y]), row=1, col=1)
        fig.add_trace(go.Bar(x=df["mode"], y=df["time_s"], name="time (median)", marker_color="#2a9d8f",
                             error_y=dict(type="data", symmetric=False, array=df["time_max_s"] - df["time_s"],
                                          arrayminus=df["time_s"] - df["time_min_s"])), row=1, col=2)
        fig.update_layout(title=f"Forward with grad vs torch.no_grad() vs inference_mode ({self.device})",
                          barmode="group", template="plotly_white")
        return fig


def _saving(grad_row, no_grad_row) -> int:
    """Bytes torch.no_grad() saves: activations and casts saved with grad, less any saved under no_grad."""
    return int(grad_row["activation_bytes"] + grad_row["cast_bytes"]
               - no_grad_row["activation_bytes"] - no_grad_row["cast_bytes"])


def _size(v) -> str:
    return human_bytes(v, missing="n/a")


def _faster(t, base) -> str:
    """How much less time `t` takes than `base`, in plain words; never a negative percentage."""
    if t is None or not base or pd.isna(t) or pd.isna(base):
        return "time not measured"
    pct = (1 - t / base) * 100
    said = f"{t * 1000:.3f} ms vs {base * 1000:.3f} ms with grad, median"
    return f"takes {pct:.0f}% less time ({said})" if pct >= 0.5 else f"is no faster ({said})"


def compare_no_grad(model_or_fn, *inputs, repeat: int = 3, **kwargs) -> Comparison:
    """Run `model_or_fn(*inputs, **kwargs)` with grad, under torch.no_grad() and under inference_mode.

    Reports, per mode: the bytes saved for backward (once per storage) split into parameters
    and buffers, inputs, activations and autocast casts (what no_grad saves is activations +
    casts); the measured peak and held memory of one forward (CUDA allocator, else the CPU
    profiler; `peak_source`); the RSS change; and the median time of `repeat` runs.
    """
    if not callable(model_or_fn):
        raise TypeError(f"gradprobe.compare_no_grad: expected a model or function, got {type(model_or_fn).__name__}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"gradprobe.compare_no_grad: repeat must be a positive int, got {repeat!r}")
    cuda = _on_cuda(model_or_fn, inputs)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    module = model_or_fn if isinstance(model_or_fn, torch.nn.Module) else getattr(model_or_fn, "__self__", None)
    module = module if isinstance(module, torch.nn.Module) else None
    params = _keys(list(module.parameters()) + list(module.buffers())) if module is not None else set()
    input_keys = _keys([inputs, kwargs]) - params

    def run(mode):
        with _ctx(mode):
            return model_or_fn(*inputs, **kwargs)

    counted = {}
    for mode in MODES:  # the counting runs come first: the measured ones then start warm
        counter = _Counter(params, input_keys)
        rss0 = rss()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out = run(mode)
        rss1 = rss()
        del out
        counted[mode] = counter.bytes, None if rss0 is None or rss1 is None else rss1 - rss0
    measured = _measure(run, cuda)
    rows = []
    for mode in MODES:
        times = []
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = run(mode)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del out
        (b, rss_delta), (peak, held, source) = counted[mode], measured[mode]
        rows.append({"mode": mode, "saved_bytes": sum(b.values()), "param_bytes": b["param"],
                     "input_bytes": b["input"], "activation_bytes": b["activation"], "cast_bytes": b["cast"],
                     "peak_bytes": peak, "held_bytes": held, "peak_source": source, "rss_delta_bytes": rss_delta,
                     "time_s": statistics.median(times), "time_min_s": min(times), "time_max_s": max(times),
                     "repeat": repeat})
    return Comparison(rows, device)
