"""The Probe: installs the collectors around a training loop and removes them all on exit.

Collectors append plain records to a Store; `to_pandas()` turns the store into
tables and runs the diagnosis rules. The probe holds names, numbers and weak
references only.
"""

from __future__ import annotations

import functools
import inspect
import math
import platform
import time
import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import __version__
from .cuts import CutLog, cause_of
from .flow import BackwardCall, Flow, rollup, status_of
from .mode import ProbeMode
from .run import RunView
from .sites import site
from .store import Store
from .targets import Targets

TRACKS = ("grads", "cuts", "memory")


class Probe(RunView):
    """Record gradient flow, cuts and autograd memory around a training loop.

    `model`: an nn.Module, a dict of name -> nn.Module, or None (observe every module
    and every leaf tensor a backward reaches). `track`: which collectors run, any of
    "grads", "cuts", "memory" (default all). `every`: record per-step detail (params and
    modules rows, gradient norms, saved tensors) every N steps; backward rows, arrival
    counts and cuts are recorded every step.
    """

    _active: "Probe | None" = None

    def __init__(self, model=None, *, track=TRACKS, every: int = 1) -> None:
        if isinstance(track, str):
            track = (track,)
        track = tuple(track)
        bad = [t for t in track if t not in TRACKS]
        if bad:
            raise ValueError(f"gradprobe.Probe: unknown track {bad}; choose from {list(TRACKS)}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"gradprobe.Probe: every must be a positive int, got {every!r}")
        self.track = track
        self.grads = "grads" in track
        self.every = every
        self.depth = 0
        self.targets = Targets()
        self.targets.on_new = self._on_new_tracked
        self.discover = model is None
        if isinstance(model, torch.nn.Module):
            self.targets.add_root("", model)
        elif isinstance(model, dict):
            for k, m in model.items():
                if not isinstance(k, str) or not isinstance(m, torch.nn.Module):
                    raise TypeError("gradprobe.Probe: a dict model must map str names to nn.Module, "
                                    f"got {type(k).__name__} -> {type(m).__name__}")
                self.targets.add_root(k, m)
        elif model is not None:
            raise TypeError(f"gradprobe.Probe: model must be an nn.Module, a dict of name -> nn.Module "
                            f"or None, got {type(model).__name__}")
        self.store = Store()
        self.cutlog = CutLog()
        self.flow = Flow(self)
        self.mode = None
        self.memory = None
        self.step_idx = 0
        self.n_backward = 0
        self.boundary = "optimizer"  # optimizer < decorator < explicit
        self.pending = False  # an optimizer.step() ended the step; applied at the next activity
        self.opt_steps = 0
        self.optimizers: set[int] = set()
        self.active_step = False  # something happened in the current step
        self.ran: set[str] = set()  # modules whose forward ran in this step
        self.stack: list = []  # ModuleInfo of forwards running now
        self.quiet = 0  # >0: inside backward or our own work
        self._suspended = False  # the mode is off the stack during optimizer.step()
        self.current_bw: BackwardCall | None = None
        self._handles: list = []
        self._orig: dict = {}
        self._cache = (None, None)
        self.t0 = time.perf_counter()
        self.meta = {
            "format": "gradprobe-run", "gradprobe_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "track": list(track), "every": every,
            "model": self._model_summary(model),
        }

    @staticmethod
    def _model_summary(model) -> str:
        if model is None:
            return "None (every module and leaf reached)"
        models = model if isinstance(model, dict) else {"": model}
        return "; ".join(f"{k + ': ' if k else ''}{type(m).__name__} "
                         f"({sum(p.numel() for p in m.parameters()):,} parameters)" for k, m in models.items())

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
        if self.boundary == "optimizer" and 0 < self.opt_steps <= len(self.optimizers):
            self._merge_first_steps()  # the first iteration's optimizer steps were not step boundaries
        self.boundary = "explicit"
        self.pending = False
        self._end_step()

    def _merge_first_steps(self) -> None:
        for table, cols in self.store.cols.items():
            if "step" in cols:
                cols["step"] = [0 if v is not None else None for v in cols["step"]]
        for cut in self.cutlog.cuts:
            cut.step = 0
        self.store.version += 1
        if self.memory is not None:
            self.memory.merge_steps()
        self.step_idx = 0

    def __call__(self, fn):
        """Decorator: every call of `fn` is one step."""
        if not callable(fn):
            raise TypeError(f"gradprobe.Probe(...) decorates a function, got {type(fn).__name__}")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                if self.boundary == "optimizer":
                    self.boundary = "decorator"
                    self.pending = False
                try:
                    return fn(*args, **kwargs)
                finally:
                    if self.boundary == "decorator":
                        self._end_step()

        wrapper.probe = self
        return wrapper

    def __enter__(self) -> "Probe":
        if self.depth == 0:
            other = Probe._active
            if other is not None and other is not self:
                raise RuntimeError("gradprobe: another Probe is already active; one probe at a time can "
                                   "observe a process. Leave the first one's `with` block first, or give one "
                                   "Probe all models as a dict, e.g. gp.Probe({'G': G, 'D': D}).")
            self._install()
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._remove()
        return None

    # --- install / remove ----------------------------------------------------
    def _install(self) -> None:
        Probe._active = self
        try:
            for t in self.targets.tracked:
                if "grads" in self.track:
                    self.flow.hook_tensor(t)
            nn = torch.nn.modules.module
            self._handles += [
                nn.register_module_forward_pre_hook(self._forward_pre),
                nn.register_module_forward_hook(self._forward_post, always_call=True),
                register_optimizer_step_pre_hook(self._optimizer_pre),
                register_optimizer_step_post_hook(self._optimizer_post),
            ]
            self._orig = {"backward": torch.autograd.backward, "grad": torch.autograd.grad,
                          "patches": (self._patched_backward, self._patched_grad)}
            torch.autograd.backward, torch.autograd.grad = self._orig["patches"]
            if "memory" in self.track:
                from .memory import MemoryCollector
                if self.memory is None:
                    self.memory = MemoryCollector(self)
                self.memory.install()
                if self.step_idx % self.every:
                    self.memory.pause()
            if "cuts" in self.track:
                self.mode = ProbeMode(self)
                torch._C._push_on_torch_function_stack(self.mode)
        except BaseException:
            self._remove()
            raise

    def _remove(self) -> None:
        """Undo everything _install did; safe to call on a partial install."""
        try:
            if self.mode is not None:
                if not self._suspended:
                    _pop_mode(self.mode)
                self._suspended = False
                self.mode = None
        finally:
            if self._orig:
                backward, grad = self._orig["patches"]
                if torch.autograd.backward is backward:
                    torch.autograd.backward = self._orig["backward"]
                if torch.autograd.grad is grad:
                    torch.autograd.grad = self._orig["grad"]
                self._orig = {}
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self.flow.remove()
            if self.memory is not None:
                self.memory.remove()
            self.stack.clear()
            self.quiet = 0
            self.current_bw = None
            Probe._active = None

    # --- step boundaries -----------------------------------------------------
    def _touch(self) -> None:
        """Activity in the current step; applies a pending optimizer boundary first."""
        if self.pending:
            self.pending = False
            self._end_step()
        self.active_step = True

    def _end_step(self) -> None:
        if not self.active_step:
            return
        if self.memory is not None:
            self.memory.end_step(self.step_idx)
        self.cutlog.end_step()
        self.ran.clear()
        self.step_idx += 1
        self.active_step = False
        self._sample_memory()

    def _sample_memory(self) -> None:
        """Memory is accounted on detail steps only (every=N), like the per-parameter rows."""
        if self.memory is not None and self.depth > 0:
            if self.step_idx % self.every:
                self.memory.pause()
            else:
                self.memory.resume()

    def _optimizer_pre(self, opt, args, kwargs) -> None:
        """optimizer.step() makes no user graph: the mode steps aside (its ops would only cost time).

        A forward or backward seen while it is aside (an LBFGS closure, or a step that raised
        before its post-hook) brings it back: see _resume_mode.
        """
        if self.mode is not None and not self._suspended and _pop_mode(self.mode):
            self._suspended = True

    def _resume_mode(self) -> None:
        if self._suspended:
            torch._C._push_on_torch_function_stack(self.mode)
            self._suspended = False

    def _optimizer_post(self, opt, args, kwargs) -> None:
        self._resume_mode()
        self.opt_steps += 1
        self.optimizers.add(id(opt))
        if self.boundary == "optimizer" and self.active_step:
            self.pending = True

    # --- module hooks --------------------------------------------------------
    def _forward_pre(self, module, args) -> None:
        if self.quiet:
            return
        if self._suspended:
            self._resume_mode()
        info = self.targets.info_of(module)
        if info is None:
            if not (self.discover and not self.stack):
                return
            self.targets.discover(module)
            info = self.targets.info_of(module)
        self._touch()
        if not self.stack and self.memory is not None:
            self.memory.on_forward(module)
        self.stack.append(info)
        self.ran.add(info.name)

    def _forward_post(self, module, args, out) -> None:
        if not self.stack or self.stack[-1].ref() is not module:
            return
        info = self.stack.pop()
        if info.params and self.grads and self.step_idx % self.every == 0 and torch.is_grad_enabled():
            with torch._C.DisableTorchFunction():  # our attribute reads need not pass through the mode
                self.flow.hook_output(info, out)

    def current_module(self) -> str | None:
        return self.stack[-1].name if self.stack else None

    def _on_new_tracked(self, tracked) -> None:
        if self.depth > 0 and "grads" in self.track:
            self.flow.hook_tensor(tracked)

    # --- cuts ----------------------------------------------------------------
    def record_cut(self, kind, op, where, upstream):
        self._touch()
        return self.cutlog.record(self.step_idx, kind, op, where, self.current_module(), upstream)

    # --- backward ------------------------------------------------------------
    def _patched_backward(self, *args, **kwargs):
        fn = self._orig["backward"]
        bound = _bind(fn, args, kwargs)
        roots = bound.get("tensors")
        caller = inspect.currentframe().f_back
        api = "tensor.backward" if caller and caller.f_code is torch.Tensor.backward.__code__ else "autograd.backward"
        create = bool(bound.get("create_graph", False))
        retain = bound.get("retain_graph")
        return self._run_backward(fn, args, kwargs, api, roots, bound.get("inputs"),
                                  create if retain is None else bool(retain), create)

    def _patched_grad(self, *args, **kwargs):
        fn = self._orig["grad"]
        bound = _bind(fn, args, kwargs)
        create = bool(bound.get("create_graph", False))
        retain = bound.get("retain_graph")
        return self._run_backward(fn, args, kwargs, "autograd.grad", bound.get("outputs"), bound.get("inputs"),
                                  create if retain is None else bool(retain), create)

    def _run_backward(self, fn, args, kwargs, api, roots, inputs, retain, create):
        if self.quiet or self.current_bw is not None or Probe._active is not self:
            return fn(*args, **kwargs)  # nested (reentrant checkpoint), our own work, or a stale patch
        self._resume_mode()
        self._touch()
        roots = [roots] if isinstance(roots, torch.Tensor) else [r for r in (roots or ()) if
                                                                  isinstance(r, torch.Tensor)]
        bw = BackwardCall(self.n_backward, self.step_idx, site(3), api, retain, create,
                          self.step_idx % self.every == 0)
        self.n_backward += 1
        try:
            self._begin_backward(bw, roots, inputs)
        except Exception as e:  # never break training because of the probe
            warnings.warn(f"gradprobe: could not prepare backward {bw.index}: {e!r}")
        self.current_bw = bw
        self.quiet += 1
        bw.t = time.perf_counter() - self.t0
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            bw.error = str(e)
            raise
        finally:
            bw.duration = time.perf_counter() - self.t0 - bw.t
            self.quiet -= 1
            self.current_bw = None
            try:
                self._finish_backward(bw, roots)
            except Exception as e:
                warnings.warn(f"gradprobe: could not record backward {bw.index}: {e!r}")

    def _begin_backward(self, bw, roots, inputs) -> None:
        self.quiet += 1
        try:
            if self.mode is not None:
                bw.root_tags = self.mode.tags_of(roots)
            if inputs is not None:
                inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
                bw.considered = [self.targets.track_leaf(t).index if self.discover
                                 else self.targets.by_tensor[t].index
                                 for t in inputs if self.discover or t in self.targets.by_tensor]
            elif bw.api == "autograd.grad":
                bw.considered = []
            if self.discover:
                for leaf in _graph_leaves(roots):
                    self.targets.track_leaf(leaf)
            if self.memory is not None:
                self.memory.begin_backward(bw, roots)
        finally:
            self.quiet -= 1

    def _finish_backward(self, bw, roots) -> None:
        self.quiet += 1
        try:
            counts = {}
            if "grads" in self.track:
                counts = self._flow_rows(bw)
            root_cut = self._root_cut(bw)
            self.store.add("backward", step=bw.step, backward=bw.index, site=bw.site,
                           retain_graph=bw.retain_graph, create_graph=bw.create_graph, api=bw.api,
                           t=bw.t, duration=bw.duration, error=bw.error,
                           cut_kind=root_cut.kind if root_cut else None,
                           cut_site=root_cut.describe() if root_cut else None,
                           **{f"params_{k}": v for k, v in counts.items()})
            if self.memory is not None:
                self.memory.end_backward(bw)
        finally:
            self.quiet -= 1

    def _flow_rows(self, bw) -> dict:
        """params and modules rows of this backward (on detail steps); returns the status counts.

        Off detail steps (every=N) no gradient is measured: a tensor that got one counts as
        flow, and zero/nonfinite are unknown (missing).
        """
        if bw.error and not bw.root_tags:
            return {}  # it raised midway (e.g. an in-place error): what arrived says nothing; see findings
        stats, outs = self.flow.measure(bw) if bw.detail else ({}, {})
        tracked = self.targets.tracked
        indices = range(len(tracked)) if bw.considered is None else bw.considered
        arrived = dict.fromkeys(bw.arrived)
        live = [(i, tracked[i], tracked[i].ref()) for i in indices]
        live = [(i, t, x) for i, t, x in live if x is not None]
        if bw.detail:
            # arrived but not measurable (an optimizer in a post-accumulate hook took .grad): flow, norm NaN
            status = [status_of(stats.get(i), x.requires_grad) if i in stats or i not in arrived
                      else "flow" if x.requires_grad else "frozen" for i, t, x in live]
        else:
            status = ["frozen" if not x.requires_grad else "flow" if i in arrived else "none"
                      for i, t, x in live]
        none = [i for (i, t, x), s in zip(live, status) if s == "none"]
        causes = self._explain(bw, none)
        counts = {s: status.count(s) for s in ("flow", "none", "zero", "nonfinite", "frozen")}
        if not bw.detail:
            counts["zero"] = counts["nonfinite"] = None
            return counts
        order = {i: k for k, i in enumerate(arrived)}
        nan2 = (math.nan, math.nan)
        no_cause = (None, None)
        self.store.extend(
            "params", len(live), step=bw.step, backward=bw.index,
            param=[t.name for i, t, x in live], module=[t.module for i, t, x in live], status=status,
            cause=[causes.get(i, no_cause)[0] for i, t, x in live],
            site=[causes.get(i, no_cause)[1] for i, t, x in live],
            grad_norm=[stats.get(i, nan2)[0] for i, t, x in live],
            grad_maxabs=[stats.get(i, nan2)[1] for i, t, x in live],
            arrival=[order.get(i, math.nan) for i, t, x in live],
            numel=[t.numel for i, t, x in live], kind=[t.kind for i, t, x in live])
        self._module_rows(bw, {i: s for (i, t, x), s in zip(live, status)}, outs)
        return counts

    def _root_cut(self, bw):
        """The cut the backward's roots depend on (the first), if any."""
        if not bw.root_tags:
            return None
        return self.cutlog.cuts[min(bw.root_tags)]

    def _explain(self, bw, none: list[int]) -> dict:
        """index -> (cause, site) for tracked tensors that got no gradient in this backward."""
        if not none:
            return {}
        tracked = self.targets.tracked
        out = {}
        root_cuts = [self.cutlog.cuts[c] for c in sorted(bw.root_tags)]
        step_cuts = self.cutlog.current
        for i in none:
            name = tracked[i].name
            for cut in root_cuts:
                if name in cut.upstream:
                    cut.effective = True
                    if cut.backward is None:
                        cut.backward = bw.index
                    out[i] = (cause_of(cut.kind), cut.site)
                    break
            else:
                for cut in step_cuts:
                    if name in cut.upstream:
                        out[i] = (cause_of(cut.kind), cut.site)
                        break
                else:
                    module = tracked[i].module
                    ran = module is None or module in self.ran or any(
                        m.startswith(module + ".") for m in self.ran)
                    out[i] = ("not_in_graph" if ran else "not_used", None)
        return out

    def _module_rows(self, bw, status_by_index, outs) -> None:
        cols = {c: [] for c in ("module", "status", "grad_norm", "type", "parent", "depth", "order", "n_params",
                                "params_flow", "params_zero", "params_nonfinite", "params_none",
                                "params_frozen")}
        for info in self.targets.modules:
            statuses = [status_by_index[i] for i in info.params if i in status_by_index]
            norm = outs.get(info, math.nan)
            if not statuses:
                continue  # no parameters (ReLU, ...), or none in this backward (autograd.grad on others)
            status = rollup(statuses)
            row = {"module": info.name, "status": status, "grad_norm": norm, "type": info.type,
                   "parent": info.parent,
                   "depth": info.depth, "order": info.order, "n_params": info.n_params}
            for s in ("flow", "zero", "nonfinite", "none", "frozen"):
                row[f"params_{s}"] = statuses.count(s)
            for c, v in row.items():
                cols[c].append(v)
        self.store.extend("modules", len(cols["module"]), step=bw.step, backward=bw.index, **cols)

    # --- tables ---------------------------------------------------------------
    def to_pandas(self) -> dict:
        """Every table (see API.md), with findings diagnosed from them."""
        key = (self.store.version, len(self.cutlog.cuts), sum(c.count for c in self.cutlog.cuts))
        if self._cache[0] == key:
            return {k: v.copy() for k, v in self._cache[1].items()}
        from .diagnose import diagnose
        from .schema import frame
        tables = {t: self.store.frame(t) for t in self.store.cols if t != "findings"}
        order = {t.name: t.index for t in self.targets.tracked}
        tables["cuts"] = frame("cuts", [c.row(order) for c in self.cutlog.cuts])
        if self.memory is not None:
            self.memory.fill_tables(tables)
        tables["findings"] = diagnose(tables)
        self._cache = (key, tables)
        return {k: v.copy() for k, v in tables.items()}


def _pop_mode(mode) -> bool:
    """Take our mode off the torch-function stack if it is on top (never pop someone else's)."""
    n = torch._C._len_torch_function_stack()
    if n and torch._C._get_function_stack_at(n - 1) is mode:
        torch._C._pop_torch_function_stack()
        return True
    return False


_SIGNATURES: dict = {}


def _bind(fn, args, kwargs) -> dict:
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = inspect.signature(fn)
    try:
        return sig.bind(*args, **kwargs).arguments
    except TypeError:
        return {}


def _graph_leaves(roots):
    """Leaf tensors (AccumulateGrad.variable) reachable from the roots."""
    seen, stack, leaves = set(), [r.grad_fn for r in roots if r.grad_fn is not None], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.append(var)
        stack.extend(n for n, _ in node.next_functions)
    return leaves

