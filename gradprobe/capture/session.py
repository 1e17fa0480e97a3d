"""The capture session: owns the parts, installs them, and routes events between them.

Parts: targets (names), clock (steps), schedule (detail or not), backwards (interception),
flow (arrival and norms), modules (stack, detail only), mode (cuts, detail only), amp
(GradScaler), memory (saved tensors). Records go to the store, the cut log and small
tables of steps and limits; nothing here analyses them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..store import Store
from .amp import Amp
from .backward import Backwards
from .clock import StepClock
from .cuts import CutLog
from .graph import leaves, newest_seq
from .handles import Group, ModeOnStack, Patch
from .flow import Flow
from .modules import ModuleStack
from .rows import backward_rows
from .schedule import Schedule
from .targets import Targets

log = logging.getLogger("gradprobe")

_LIMITS = {
    "torch.func": "a torch.func transform (grad, vmap, jacrev...) ran its own backward: not recorded, and the "
                  "probe's per-op capture does not see inside torch.func transforms",
    "compile": "torch.compile traced or ran a compiled region: what ran inside it was not seen per op "
               "(cuts, saved tensors, module output norms); gradients of parameters are still recorded",
    "thread": "forward/backward ran in another thread than the one that entered the probe: backwards and "
              "gradients there are recorded, cuts and module detail (thread-local) are not",
    "error": "the probe hit an internal error and skipped a record",
}


class Capture:
    def __init__(self, model, track, every) -> None:
        self.installed = None
        self.track = track
        self.grads = "grads" in track
        self.schedule = Schedule(every)
        self.targets = Targets()
        self.targets.on_new = self._on_new_tracked
        self.discover = model is None
        self.compiled = False  # torch.compile is in play: per-op capture stays off (see _compiled)
        roots = model.values() if isinstance(model, dict) else [model]
        self.compiled_model = any(_is_compiled(m) for m in roots)
        if isinstance(model, torch.nn.Module):
            self.targets.add_root("", _uncompiled(model))
        elif isinstance(model, dict):
            for k, m in model.items():
                if not isinstance(k, str) or not isinstance(m, torch.nn.Module):
                    raise TypeError("gradprobe.Probe: a dict model must map str names to nn.Module, "
                                    f"got {type(k).__name__} -> {type(m).__name__}")
                self.targets.add_root(k, _uncompiled(m))
        elif model is not None:
            raise TypeError(f"gradprobe.Probe: model must be an nn.Module, a dict of name -> nn.Module "
                            f"or None, got {type(model).__name__}")
        self.store = Store()
        self.cutlog = CutLog()
        self.flow = Flow(self)
        self.modules = ModuleStack(self)
        self.backwards = Backwards(self._backward_begins, self._backward_ends, self._skipped)
        self.clock = StepClock(self._step_ends, self._merge, self._arm)
        self.amp = Amp(self)
        self.memory = None
        if "memory" in track:
            from .memory import MemoryCollector
            self.memory = MemoryCollector(self)
        self.mode = None
        if "cuts" in track:
            from .mode import ProbeMode
            self.mode = ProbeMode(self)
        self.mode_handle: ModeOnStack | None = None
        self.detail = self.schedule.detail(0)
        self.instruments = Group()  # detail-step handles, on or off with the schedule
        self.want_off = False  # the instruments are to come off at the next chance (see try_off)
        self.arm_later = None  # a step whose instruments were set during a backward: applied at its end
        self.busy = 0  # >0: inside a backward or the probe's own work
        self.n_backward = 0
        self.thread = None
        self.sigs: list = []  # arrival signature of each backward of the previous step (triggers)
        self.sigs_now: list = []
        self.limits: dict = {}  # (what, site) -> [first step, count]
        self.threads: set = set()
        self._cache = (None, None)

    @property
    def step_idx(self) -> int:
        return self.clock.step

    def current_module(self) -> str | None:
        return self.modules.current()

    # --- install / remove ----------------------------------------------------
    def install(self, stack) -> None:
        for h in self.backwards.install():
            stack.add(h)
        stack.add(register_optimizer_step_pre_hook(self._optimizer_pre))
        stack.add(register_optimizer_step_post_hook(self._optimizer_post))
        for h in self.amp.install():
            stack.add(h)
        stack.add(Patch(torch.autograd.graph, "disable_saved_tensors_hooks", self._functorch_region()))
        if self.grads:
            stack.add(self.flow)
            for t in self.targets.tracked:
                self.flow.hook(t)
        if self.memory is not None:
            stack.add(_MemoryHandle(self.memory))
        stack.add(self.instruments)
        stack.callback(self._mode_off)
        for h in self._watch_compile():
            stack.add(h)
        self._arm(self.clock.step)

    def _mode_off(self) -> None:
        if self.mode_handle is not None:
            self.mode_handle.remove()
            self.mode_handle = None

    def after_close(self) -> None:
        self.want_off = False
        self.modules.clear()
        self.mode_handle = None
        self.busy = 0

    def _arm(self, step: int) -> None:
        """Set the detail instruments for `step` (the one under way or the one about to begin).

        Not while a backward runs (an optimizer stepped in a post-accumulate-grad hook): the engine
        restores the thread's saved-tensor hooks when it returns, so that waits for its end.
        """
        tid = threading.get_ident()
        if self.thread is not None and tid != self.thread:
            return
        if tid in self.backwards.by_thread:
            self.arm_later = step
            return
        on = self.schedule.detail(step) and not self.compiled
        if on:
            self.want_off = False
            if self.mode is not None:
                self.mode.enabled = True
            if not self.instruments.handles:
                self.instruments.add(_Hooks(self.modules.install()))
                if self.memory is not None:
                    self.memory.resume()
            if self.mode is not None and self.mode_handle is None:
                self.mode_handle = ModeOnStack(self.mode)
                self.mode_handle.push()
        else:
            if self.memory is not None:
                self.memory.pause()  # installed on entering the probe: off until a detail step
            if not (self.instruments.handles or self.mode_handle is not None):
                return
            if self.mode is not None:
                self.mode.enabled = False  # inert at once; off the stack as soon as we are outside its handler
            self.want_off = True
            self.try_off()

    def try_off(self) -> None:
        """Take the detail instruments off; the mode waits if it is inside its own handler now.

        Inside `__torch_function__` (a `loss.backward()` runs there) PyTorch has popped the mode and
        pushes it back afterwards, so it can only leave the stack from outside: the next module
        call, optimizer step or backward retries.
        """
        tid = threading.get_ident()
        if not self.want_off or (self.thread is not None and tid != self.thread) or tid in self.backwards.by_thread:
            return
        if self.instruments.handles:
            self.instruments.remove()
            self.modules.clear()
            if self.memory is not None:
                self.memory.pause()
        h = self.mode_handle
        if h is not None:
            if h.on and not h.on_top():
                return
            h.remove()
            self.mode_handle = None
        self.want_off = False

    def mode_aside(self) -> bool:
        h = self.mode_handle
        return h is not None and threading.get_ident() == self.thread and h.pop_if_top()

    def resume_mode(self) -> None:
        h = self.mode_handle
        if h is not None and not h.on and not self.want_off and threading.get_ident() == self.thread:
            h.push()

    def _watch_compile(self) -> list:
        """torch.compile guards on hooks and modes: once it is in play, per-op capture stays off.

        Compiled code is traced once; hooks or a torch-function mode that come and go with the
        schedule would add graph breaks and recompilations (and OptimizedModule warns about global
        hooks). So when a model given to the probe is compiled, something was compiled before, or a
        compilation starts while the probe is on, the probe keeps only what needs no per-op hook:
        backwards, arrival and norms of gradients, steps.
        """
        handles = []
        if self.compiled or self.compiled_model or _compiled_before():
            self._compiled()
            return handles
        capture = self

        def on_start(*args):
            capture._compiled()

        def register():
            from torch._dynamo import callback_handler
            _not_for_dynamo()
            callback_handler.register_start_callback(on_start)
            handles.append(_Callback(callback_handler, on_start))

        if "torch._dynamo" in sys.modules:
            register()
        else:  # torch.compile imports dynamo: register then
            orig = torch.compile

            def compile(*args, **kwargs):
                if not any(isinstance(h, _Callback) for h in handles):
                    register()
                return orig(*args, **kwargs)

            compile.__wrapped__ = orig
            handles.append(Patch(torch, "compile", compile))
        return handles

    def _compiled(self) -> None:
        if not self.compiled:
            self.compiled = True
            self.note("compile")
            self.want_off = True
            if self.mode is not None:
                self.mode.enabled = False
            self.try_off()

    def _functorch_region(self):
        """torch.func transforms refuse saved-tensor hooks: the probe steps aside inside them and says so."""
        orig = torch.autograd.graph.disable_saved_tensors_hooks
        capture = self

        @contextlib.contextmanager
        def disable_saved_tensors_hooks(error_message):
            if "torch.func" in error_message:
                capture.note("torch.func")
            capture.busy += 1
            paused = capture.memory is not None and capture.memory.pause()
            try:
                with orig(error_message):
                    yield
            finally:
                capture.busy -= 1
                if paused:
                    capture.memory.resume()

        disable_saved_tensors_hooks.__wrapped__ = orig
        return disable_saved_tensors_hooks

    def _on_new_tracked(self, tracked) -> None:
        if self.installed is not None and self.grads:
            self.flow.hook(tracked)

    # --- events from the parts -------------------------------------------------
    def graph_activity(self) -> None:
        """A graph is being built (forward): applies a pending step boundary."""
        if self.clock.pending:
            self.clock.touch()
        else:
            self.clock.active = True

    def record_cut(self, kind, op, where, upstream, module=...):
        return self.cutlog.record(self.clock.step, kind, op, where,
                                  self.current_module() if module is ... else module, upstream)

    def _optimizer_pre(self, opt, args, kwargs) -> None:
        self.try_off()
        self.mode_aside()  # optimizer internals make no user graph; an LBFGS closure's forward brings it back

    def _optimizer_post(self, opt, args, kwargs) -> None:
        self.try_off()
        self.resume_mode()
        self.clock.optimizer_stepped(id(opt))

    def scaler_skipped(self, opt, scale) -> None:
        self.store.add("steps", step=self.clock.step, detail=self.detail, amp_skipped=True, grad_scale=scale)
        self.clock.optimizer_stepped(id(opt))

    def note(self, what: str, where=None) -> None:
        entry = self.limits.get((what, where))
        if entry is None:
            self.limits[(what, where)] = [self.clock.step, 1]
            log.info("gradprobe: %s", _LIMITS.get(what, what))
            self.store.version += 1
        else:
            entry[1] += 1

    def _skipped(self, why: str) -> None:
        self.note(why)

    def _step_ends(self, step: int) -> None:
        self.store.add("steps", step=step, detail=self.detail, amp_skipped=False)
        if self.memory is not None:
            self.memory.end_step(step)
        self.cutlog.end_step()
        self.modules.end_step()
        self.sigs, self.sigs_now = self.sigs_now, []
        self.schedule.detail_steps += self.detail
        self.detail = self.schedule.detail(step + 1)
        self._arm(step + 1)

    def _merge(self, to: int) -> None:
        for cols in self.store.cols.values():
            if "step" in cols:
                cols["step"] = [v if v is None or v <= to else to for v in cols["step"]]
        steps = self.store.cols["steps"]
        keep = [k for k, s in enumerate(steps["step"]) if not (s == to and not steps["amp_skipped"][k])]
        for c, values in steps.items():
            steps[c] = [values[k] for k in keep]
        self.cutlog.merge(to)
        if self.memory is not None:
            self.memory.merge_steps()
        self.store.version += 1

    # --- backward ------------------------------------------------------------------
    def _backward_begins(self, bw, roots) -> None:
        self.try_off()
        tid = threading.get_ident()
        if tid != self.thread and tid not in self.threads:
            self.threads.add(tid)
            self.note("thread", f"thread {threading.current_thread().name}")
        self.busy += 1
        try:
            self.targets.materialised()
            if self.grads:
                self.flow.refresh()
            self.clock.backward_begins(newest_seq(roots))
            bw.index, bw.step, bw.detail = self.n_backward, self.clock.step, self.detail
            self.n_backward += 1
            if self.mode is not None:
                bw.root_tags = self.mode.tags_of(roots)
            if bw.inputs is not None:
                by = self.targets.by_tensor
                bw.considered = [self.targets.track_leaf(t).index if self.discover else by[t].index
                                 for t in bw.inputs if self.discover or t in by]
            elif bw.api == "autograd.grad":
                bw.considered = []
            if self.discover:
                for leaf in leaves(roots):
                    self.targets.track_leaf(leaf)
            if self.memory is not None:
                self.memory.begin_backward(bw, roots)
        except BaseException:
            self.busy -= 1
            raise
        # busy stays up while the backward runs (the mode and module hooks stand aside) until it ends

    def _backward_ends(self, bw, roots) -> None:
        try:
            counts = {}
            if self.grads and not (bw.error and not bw.root_tags):
                stats, outs = ({}, {})
                if bw.detail:
                    stats, outs = self.flow.measure(bw, self.amp.scale_tensor())
                counts = backward_rows(self, bw, stats, outs)
            root_cut = self.cutlog.cuts[min(bw.root_tags)] if bw.root_tags else None
            self.store.add("backward", step=bw.step, backward=bw.index, site=bw.site,
                           retain_graph=bw.retain_graph, create_graph=bw.create_graph, api=bw.api,
                           t=bw.t, duration=bw.duration, error=bw.error, detail=bw.detail,
                           cut_kind=root_cut.kind if root_cut else None,
                           cut_site=root_cut.describe() if root_cut else None,
                           **{f"params_{k}": v for k, v in counts.items()})
            if self.memory is not None:
                self.memory.end_backward(bw)
            self._watch_changes(bw, counts)
        finally:
            self.busy -= 1
        self.clock.backward_ends(torch._C._autograd._get_sequence_nr())
        if self.arm_later is not None:
            step, self.arm_later = self.arm_later, None
            self._arm(step)
        self.try_off()

    def _watch_changes(self, bw, counts) -> None:
        """Trigger a full capture of the next step when arrival changed or a non-finite value appeared."""
        sig = frozenset(bw.arrived)
        pos = len(self.sigs_now)
        self.sigs_now.append(sig)
        changed = pos < len(self.sigs) and self.sigs[pos] != sig
        if changed or counts.get("nonfinite"):
            self.schedule.trigger(self.clock.step + 1)

    # --- tables ------------------------------------------------------------------
    def version(self):
        return (self.store.version, len(self.cutlog.cuts), sum(c.count for c in self.cutlog.cuts),
                len(self.limits))

    def tables(self) -> dict:
        from ..schema import frame
        tables = {t: self.store.frame(t) for t in self.store.cols if t != "findings"}
        order = {t.name: t.index for t in self.targets.tracked}
        tables["cuts"] = frame("cuts", [c.row(order) for c in self.cutlog.cuts])
        tables["limits"] = frame("limits", [
            {"step": s, "what": what, "site": where, "note": _LIMITS.get(what, what), "count": n}
            for (what, where), (s, n) in self.limits.items()])
        if self.memory is not None:
            self.memory.fill_tables(tables)
        return tables


def _not_for_dynamo() -> None:
    """Dynamo runs our hooks, and all they call, as they are instead of compiling them as frames.

    (A compiled module's own hooks run eagerly inside dynamo's context: without this, each Python
    function they call would be a frame to compile.)
    """
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return
    from .flow import Flow, _Arrival
    from .mode import ProbeMode
    skip = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)
    fns = [ModuleStack._pre, ModuleStack._post, Flow.hook_output, _Arrival.__call__,
           ProbeMode.__torch_function__, Capture._compiled, Backwards._engine]
    for fn in fns:
        set_code_exec_strategy(fn.__code__, skip)
        for const in fn.__code__.co_consts:
            if hasattr(const, "co_code"):
                set_code_exec_strategy(const, skip)


def _is_compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _uncompiled(module):
    """The module a torch.compile wrapper runs (names without `_orig_mod.`)."""
    return module._orig_mod if _is_compiled(module) else module


def _compiled_before() -> bool:
    """Compiled code from before the probe is cached in this process (torch._dynamo.reset() clears it)."""
    convert = sys.modules.get("torch._dynamo.convert_frame")
    try:
        return convert is not None and any(r() is not None for r in convert.output_codes.seen)
    except Exception:
        return False


class _Callback:
    def __init__(self, handler, fn) -> None:
        self.handler, self.fn = handler, fn

    def remove(self) -> None:
        if self.fn in self.handler.start_callbacks:
            self.handler.remove_start_callback(self.fn)


class _Hooks:
    """Handles of torch hooks as one handle."""

    def __init__(self, handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _MemoryHandle:
    def __init__(self, memory) -> None:
        self.memory = memory
        memory.install()

    def remove(self) -> None:
        self.memory.remove()
