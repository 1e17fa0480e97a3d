"""What torch.no_grad() saves: the same forward with grad, under no_grad and under inference_mode.

Each mode runs `repeat` times for time (no hooks), plus once with a saved-tensor
counter for the bytes autograd kept. Peak memory comes from the CUDA allocator
when the inputs or model are on CUDA (its peak counter is reset for the run, as
torch.cuda.reset_peak_memory_stats does); on CPU, which has no allocator
statistics, the peak is the saved-tensor accounting and RSS is shown as is.
"""

from __future__ import annotations

import statistics
import time

import pandas as pd
import torch

from .memdiag import human
from .capture.memory import _rss
from .text import human_bytes

MODES = ("grad", "no_grad", "inference_mode")


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


class _Counter:
    """Saved-tensor hooks that count bytes once per storage (a view keeps its whole storage).

    `activation` leaves out the storages of parameters and inputs, which exist without autograd.
    """

    def __init__(self, known):
        self.known = known
        self.seen: dict = {}
        self.activation = 0

    def pack(self, t):
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key not in self.seen:
                self.seen[key] = st.nbytes()
                if key not in self.known:
                    self.activation += st.nbytes()
        except Exception:
            pass
        return t.detach()

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _keys(tensors) -> set:
    out = set()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            try:
                out.add((t.untyped_storage().data_ptr(), t.device))
            except Exception:
                pass
    return out


class Comparison:
    """Result of compare_no_grad: `.to_pandas()`, `.figure()`, `str()`, and HTML in notebooks."""

    def __init__(self, rows: list[dict], device: str):
        self.rows = rows
        self.device = device

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows).astype({"saved_bytes": "int64", "activation_bytes": "int64",
                                               "peak_bytes": "Int64", "rss_delta_bytes": "Int64"})

    def __str__(self) -> str:
        df = self.to_pandas()
        base = df.set_index("mode")
        lines = [f"torch.no_grad() comparison on {self.device} ({int(df['repeat'].iloc[0])} runs per mode; "
                 f"peak from {df['peak_source'].iloc[0]})",
                 f"{'mode':<16}{'saved for backward':>20}{'of it activations':>20}{'peak':>14}{'time (median)':>16}"]
        for r in df.itertuples():
            lines.append(f"{r.mode:<16}{_size(r.saved_bytes):>20}{_size(r.activation_bytes):>20}"
                         f"{_size(r.peak_bytes):>14}{r.time_s * 1000:>13.3f} ms")
        g, n = base.loc["grad"], base.loc["no_grad"]
        if g["saved_bytes"] > 0:
            lines.append(f"torch.no_grad() saves {human(g['saved_bytes'] - n['saved_bytes'])} of saved tensors per "
                         f"forward and {_pct(n['time_s'], g['time_s'])} of the time.")
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
        fig.add_trace(go.Bar(x=df["mode"], y=df["saved_bytes"], name="saved for backward",
                             hovertext=[human(v) for v in df["saved_bytes"]], marker_color="#457b9d"), row=1, col=1)
        fig.add_trace(go.Bar(x=df["mode"], y=df["peak_bytes"].astype("float64"), name=f"peak ({df['peak_source'][0]})",
                             marker_color="#e76f51"), row=1, col=1)
        fig.add_trace(go.Bar(x=df["mode"], y=df["time_s"], name="time (median)", marker_color="#2a9d8f",
                             error_y=dict(type="data", symmetric=False, array=df["time_max_s"] - df["time_s"],
                                          arrayminus=df["time_s"] - df["time_min_s"])), row=1, col=2)
        fig.update_layout(title=f"Forward with grad vs torch.no_grad() vs inference_mode ({self.device})",
                          barmode="group", template="plotly_white")
        return fig


def _size(v) -> str:
    return human_bytes(v, missing="n/a")


def _pct(a, b) -> str:
    return "n/a" if not b else f"{(1 - a / b) * 100:.0f}%"


def compare_no_grad(model_or_fn, *inputs, repeat: int = 3, **kwargs) -> Comparison:
    """Run `model_or_fn(*inputs, **kwargs)` with grad, under torch.no_grad() and under inference_mode.

    Reports, per mode: bytes saved for backward (counted once per storage), peak memory
    (CUDA allocator peak above the start when on CUDA; else the saved-tensor bytes), RSS
    change and the median time of `repeat` runs.
    """
    if not callable(model_or_fn):
        raise TypeError(f"gradprobe.compare_no_grad: expected a model or function, got {type(model_or_fn).__name__}")
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"gradprobe.compare_no_grad: repeat must be a positive int, got {repeat!r}")
    cuda = _on_cuda(model_or_fn, inputs)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    known = _keys(list(inputs) + list(kwargs.values()) + (
        list(model_or_fn.parameters()) + list(model_or_fn.buffers()) if isinstance(model_or_fn, torch.nn.Module)
        else []))
    rows = []
    for mode in MODES:
        counter = _Counter(known)
        rss0 = _rss()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), _ctx(mode):
            out = model_or_fn(*inputs, **kwargs)
        rss1 = _rss()
        del out
        peak = None
        times = []
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            with _ctx(mode):
                out = model_or_fn(*inputs, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if cuda:
                p = torch.cuda.max_memory_allocated() - base
                peak = p if peak is None else max(peak, p)
            del out
        rows.append({"mode": mode, "saved_bytes": counter.total, "activation_bytes": counter.activation,
                     "peak_bytes": peak if cuda else counter.total, "peak_source": "cuda_allocator" if cuda
                     else "saved_tensors", "rss_delta_bytes": None if rss0 is None or rss1 is None else rss1 - rss0,
                     "time_s": statistics.median(times), "time_min_s": min(times), "time_max_s": max(times),
                     "repeat": repeat})
    return Comparison(rows, device)
