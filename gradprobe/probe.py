"""The Probe: a facade that wires the capture parts (gradprobe/capture/) around a training loop.

Every step, cheaply: backward rows, which tracked tensors received a gradient, steps. On the
detail steps the schedule picks: cuts (a torch-function mode), module hooks, gradient norms
and saved tensors. Everything installed goes on one ExitStack and comes off on exit.
"""

from __future__ import annotations

import functools
import logging
import platform
import threading
import time

import torch

from . import __version__
from .capture import Capture
from .capture.handles import Installed
from .output.run import RunView

TRACKS = ("grads", "cuts", "memory")
log = logging.getLogger("gradprobe")


class Probe(Capture, RunView):
    """Record gradient flow, cuts and autograd memory around a training loop.

    `model`: an nn.Module, a dict of name -> nn.Module, or None (observe every module and every
    leaf tensor a backward reaches). `track`: any of "grads", "cuts", "memory" (default all).
    `every`: None (default) is the leave-on schedule: the first 10 steps in full detail, then one
    step in 100 and the step after a change; `every=N` gives full detail every N steps
    (`every=1`: every step). Backward rows and which tensors got a gradient are kept every step.
    """

    _active: "Probe | None" = None

    def __init__(self, model=None, *, track=TRACKS, every=None) -> None:
        track = _tracks(track)
        super().__init__(model, track, every)
        self.depth = 0
        self.installed: Installed | None = None
        self.t0 = time.perf_counter()
        self.meta = {
            "format": "gradprobe-run", "gradprobe_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "track": list(track),
            "every": self.schedule.every, "schedule": self.schedule.describe(), "model": _model_summary(model),
        }

    def __repr__(self) -> str:
        state = "active" if self.depth else "inactive"
        n = self.n_backward
        return (f"<gradprobe.Probe {state}: {self.meta.get('model', '?')}; {n} backward{'' if n == 1 else 's'}"
                f"{f', at step {self.step_idx}' if n else ''}; track={list(self.track)}>")

    # --- public -------------------------------------------------------------
    def watch(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Name a leaf tensor that belongs to no module, and observe its gradient."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"probe.watch: expected a torch.Tensor, got {type(tensor).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"probe.watch: name must be a str, got {type(name).__name__}")
        if tensor.grad_fn is not None:
            raise ValueError(f"probe.watch({name!r}): the tensor was computed ({type(tensor.grad_fn).__name__}); "
                             "watch the leaf it came from (a tensor created with requires_grad=True)")
        t = self.targets.by_tensor.get(tensor)
        if t is not None:
            t.name = name
        else:
            self.targets.leaf_names[tensor] = name
            self.targets.track(tensor, name, None, "leaf")
        return tensor

    def step(self) -> None:
        """Explicit step boundary (from then on, optimizer steps no longer end steps)."""
        self.clock.explicit()

    def __call__(self, fn):
        """Decorator: every (outermost) call of `fn` is one step."""
        if not callable(fn):
            raise TypeError(f"gradprobe.Probe(...) decorates a function, got {type(fn).__name__}")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                self.clock.call_begins()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.clock.call_ends()

        wrapper.probe = self
        return wrapper

    def __enter__(self) -> "Probe":
        if self.depth == 0:
            other = Probe._active
            if other is not None and other is not self:
                raise RuntimeError("gradprobe: another Probe is already active; one probe at a time can "
                                   "observe a process. Leave the first one's `with` block first, or give one "
                                   "Probe all models as a dict, e.g. gp.Probe({'G': G, 'D': D}).")
            Probe._active = self
            self.installed = Installed()
            try:
                self.thread = threading.get_ident()
                self.install(self.installed)
            except BaseException:
                self._close()
                raise
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._close()
        return None

    def _close(self) -> None:
        try:
            if self.installed is not None:
                self.installed.close()
        finally:
            self.installed = None
            self.after_close()
            if Probe._active is self:
                Probe._active = None

    def log_to(self, sink, *, prefix: str = "gradprobe/", histograms: bool = True) -> list:
        """Write the per-step scalars (parameters without gradient, non-finite count, total grad norm, peak
        live saved bytes) and per-module gradient-norm histograms of the steps ended since the last call to a
        TensorBoard `SummaryWriter`-like or W&B run-like `sink`; returns [(step, scalars)]."""
        from .integrations.loggers import log_to
        return log_to(self, sink, prefix=prefix, histograms=histograms)

    # --- tables ---------------------------------------------------------------
    def to_pandas(self) -> dict:
        """Every table (see API.md), with findings diagnosed from them."""
        key = self.version()
        if self._cache[0] == key:
            return {k: v.copy() for k, v in self._cache[1].items()}
        from .diagnose import diagnose
        tables = self.tables()
        tables["findings"] = diagnose(tables)
        self._cache = (key, tables)
        return {k: v.copy() for k, v in tables.items()}


def _tracks(track) -> tuple:
    if isinstance(track, str):
        track = (track,)
    try:
        track = tuple(track)
    except TypeError:
        raise TypeError(f"gradprobe.Probe: track must be a name or a list of names from {list(TRACKS)}, "
                        f"got {track!r}") from None
    bad = [t for t in track if t not in TRACKS]
    if bad:
        raise ValueError(f"gradprobe.Probe: unknown track {bad}; choose from {list(TRACKS)}")
    return track


def _model_summary(model) -> str:
    if model is None:
        return "None (every module and leaf reached)"
    if not isinstance(model, (dict, torch.nn.Module)):
        return type(model).__name__
    from .capture.dist import unwrap
    models = {k: unwrap(m) for k, m in (model if isinstance(model, dict) else {"": model}).items()}
    return "; ".join(f"{k + ': ' if k else ''}{type(m).__name__} ({_count(m):,} parameters)"
                     for k, m in models.items() if isinstance(m, torch.nn.Module))


def _count(m) -> int:
    n = 0
    for p in m.parameters():
        try:
            n += p.numel()
        except ValueError:  # an uninitialised lazy parameter
            pass
    return n
