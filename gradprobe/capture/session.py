"""The capture session: owns the parts, installs them, and routes events between them.

Parts: targets (names), clock (steps), schedule (detail or not), backwards (interception),
flow (arrival and norms), modules (stack, detail only), mode (cuts, detail only), amp
(GradScaler), memory (saved tensors). Records go to the store, the cut log and small
tables of steps and limits; nothing here analyses them.
"""

from __future__ import annotations

import logging
import threading
import warnings

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..tables.store import Store
from .amp import Amp
from .aside import functorch_region, is_compiled, uncompiled, watch_compile
from .backward import Backwards
from .clock import StepClock
from .cuts import CutLog
from .dist import LIMIT_NOTES, Dist, unwrap
from .gradstats import measure
from .graph import leaves, newest_seq
from .flow import Flow
from .handles import MemoryHandle, Patch
from .instruments import Instruments
from .modules import ModuleStack
from .numerics import Numerics
from .rows import backward_rows
from .schedule import Schedule
from .sites import warnings_at_user_line
from .targets import Targets

log = logging.getLogger("gradprobe")


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
        self.compiled_model = any(is_compiled(m) for m in roots)
        if isinstance(model, torch.nn.Module):
            self.targets.add_root("", unwrap(uncompiled(model)))
        elif isinstance(model, dict):
            for k, m in model.items():
                if not isinstance(k, str) or not isinstance(m, torch.nn.Module):
                    raise TypeError("gradprobe.Probe: a dict model must map str names to nn.Module, "
                                    f"got {type(k).__name__} -> {type(m).__name__}")
                self.targets.add_root(k, unwrap(uncompiled(m)))
        elif model is not None:
            raise TypeError(f"gradprobe.Probe: model must be an nn.Module, a dict of name -> nn.Module "
                            f"or None, got {type(model).__name__}")
        self.store = Store()
        self.cutlog, self.dist = CutLog(), Dist(self, model)  # dist: DDP/FSDP2 arrival and this rank
        self.flow = Flow(self)
        self.modules = ModuleStack(self)
        self.backwards = Backwards(self._backward_begins, self._backward_ends, self.note)
        self.clock = StepClock(self._step_ends, self._merge, self._arm)
        self.amp = Amp(self)
        self.memory = None
        if "memory" in track:
            from .memory import MemoryCollector
            self.memory = MemoryCollector(self)
        self.mode = None
        if "cuts" in track or "memory" in track:  # memory alone: the mode names ops and in-place writes
            from .mode import ProbeMode
            self.mode = ProbeMode(self, cuts="cuts" in track)
        self.detail = self.schedule.detail(0)  # `clock` exists from here on: see detail_of
        self.instruments = Instruments(self)  # detail-step hooks and mode, on or off with the schedule
        self.numerics = Numerics(self)  # where the first NaN/Inf came from (armed after a non-finite gradient)
        self.busy = 0  # >0: inside a backward or the probe's own work
        self.n_backward = 0
        self.thread = None
        self.sigs: list = []  # arrival signature of each backward of the previous step (triggers)
        self.sigs_now: list = []
        self.limits: dict = {}  # (what, site) -> [first step, count]
        self.bad_weights: dict = {}  # parameter name -> first step an optimizer step left it non-finite
        self.threads: set = set()
        self._cache = (None, None)
        # what happened between two backwards (retain_graph verdicts): optimizer steps so far, and the
        # tracked gradients' identity/version after a retain_graph=True backward (zero_grad, clipping...)
        self.opt_steps = 0
        self._grad_sig = None
        self._between: dict = {}  # id(BackwardCall) -> (opt_steps, grads_changed) taken when it began

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
        stack.add(Patch(torch.autograd.graph, "disable_saved_tensors_hooks", functorch_region(self)))
        stack.add(Patch(warnings, "showwarning", warnings_at_user_line()))
        if self.grads:
            stack.add(self.flow)
            for t in self.targets.tracked:
                self.flow.hook(t)
        if self.memory is not None:
            stack.add(MemoryHandle(self.memory))
        stack.add(self.instruments)
        stack.add(self.numerics)  # after the instruments: its mode leaves the stack first
        watch_compile(self, stack)
        self.instruments.arm(self.clock.step)

    def after_close(self) -> None:
        self.instruments.closed()
        self.modules.clear()
        self.busy = 0

    def _compiled(self) -> None:
        if not self.compiled:
            self.compiled = True
            self.note("compile")
            self.instruments.off_soon()

    def detail_of(self, step: int) -> bool:
        """Whether `step` is captured in full. While the first iteration is still being learnt (no
        optimizer seen yet, first MERGE_WINDOW steps) the steps so far may fold into step 0: they are
        captured like step 0, so a detail step 0 is complete whatever it turns out to hold."""
        return self.schedule.detail(step) or (self.clock.provisional() and self.schedule.detail(0))

    def _arm(self, step: int) -> None:
        self.instruments.arm(step)

    def _on_new_tracked(self, tracked) -> None:
        if self.installed is not None and self.grads:
            self.flow.hook(tracked)

    # --- events from the parts -------------------------------------------------
    def graph_activity(self) -> None:
        """A graph is being built (forward): applies a pending step boundary."""
        self.clock.touch()
        if self.numerics.armed is not None or self.numerics.mode is not None:
            self.numerics.graph_activity()

    def record_cut(self, kind, op, where, upstream, module=...):
        return self.cutlog.record(self.clock.step, kind, op, where,
                                  self.current_module() if module is ... else module, upstream)

    def _optimizer_pre(self, opt, args, kwargs) -> None:
        self.numerics.try_off()
        self.instruments.try_off()
        self.instruments.mode_aside()  # optimizer internals make no user graph; an LBFGS closure's forward brings it back

    def _optimizer_post(self, opt, args, kwargs) -> None:
        self.opt_steps += 1
        self.instruments.try_off()
        self.instruments.resume_mode()
        self.clock.optimizer_stepped(id(opt))

    def _check_weights(self) -> None:
        """A detail backward found non-finite gradients: are the weights themselves NaN/Inf?

        Checked only then (a pass over every weight on every step would cost as much as the norms).
        """
        tracked = [(t, p) for t in self.targets.tracked if (p := t.ref()) is not None]
        if not tracked:
            return
        with torch.no_grad():
            measured = measure([p.detach() for _, p in tracked])
        for (t, _), (_, status) in zip(tracked, measured):
            if status == "nonfinite" and t.name not in self.bad_weights:
                self.bad_weights[t.name] = self.clock.step
                self.store.version += 1

    def scaler_skipped(self, opt, scale) -> None:
        self.opt_steps += 1  # an iteration boundary all the same
        self.store.add("steps", step=self.clock.step, detail=self.detail, amp_skipped=True, grad_scale=scale)
        self.clock.optimizer_stepped(id(opt))

    def note(self, what: str, where=None) -> None:
        entry = self.limits.get((what, where))
        if entry is None:
            self.limits[(what, where)] = [self.clock.step, 1]
            log.info("gradprobe: not seen by the probe: %s", what)
            self.store.version += 1
        else:
            entry[1] += 1

    def _step_ends(self, step: int) -> None:
        self.store.add("steps", step=step, detail=self.detail, amp_skipped=False)
        if self.memory is not None:
            self.memory.end_step(step)
        self.cutlog.end_step()
        self.modules.end_step()
        self.sigs, self.sigs_now = self.sigs_now, []
        self.detail = self.detail_of(step + 1)
        self.instruments.arm(step + 1)
        self.numerics.step_begins(step + 1)

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
        self.numerics.forward_done()
        self.instruments.try_off()
        tid = threading.get_ident()
        if tid != self.thread and tid not in self.threads:
            self.threads.add(tid)
            self.note("thread", f"thread {threading.current_thread().name}")
        self.busy += 1
        try:
            self.targets.materialised()
            self.dist.begin(bw)  # FSDP2 names bound to sharded parameters; .grad signatures (DDP/FSDP2)
            if self.grads:
                self.flow.refresh()
            self.clock.backward_begins(newest_seq(roots))
            bw.index, bw.step, bw.detail = self.n_backward, self.clock.step, self.detail
            changed = None
            if self._grad_sig is not None:  # the previous backward retained its graph
                changed, self._grad_sig = self._grads_signature() != self._grad_sig, None
            self._between[id(bw)] = (self.opt_steps, changed)
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
                self.dist.end(bw)  # what DDP/FSDP2 wrote into .grad arrived too (used on another rank)
                stats, outs = self.flow.measure(bw, self.amp.scale_tensor()) if bw.detail else ({}, {})
                counts = backward_rows(self, bw, stats, outs)
            root_cut = self.cutlog.cuts[min(bw.root_tags)] if bw.root_tags else None
            opt_steps, grads_changed = self._between.pop(id(bw), (None, None))
            self.store.add("backward", step=bw.step, backward=bw.index, site=bw.site,
                           retain_graph=bw.retain_graph, create_graph=bw.create_graph, api=bw.api,
                           t=bw.t, duration=bw.duration, error=bw.error, detail=bw.detail,
                           cut_kind=root_cut.kind if root_cut else None,
                           cut_site=root_cut.describe() if root_cut else None,
                           opt_steps=opt_steps, grads_changed=grads_changed,
                           freed_graph=bw.freed_graph, carried_site=bw.carried_site,
                           **{f"params_{k}": v for k, v in counts.items()})
            if self.memory is not None:
                self.memory.end_backward(bw)
            self._grad_sig = self._grads_signature() if bw.retain_graph and not bw.error else None
            if counts.get("nonfinite"):
                self._check_weights()
            self._watch_changes(bw, counts)
        finally:
            self.busy -= 1
        self.clock.backward_ends(torch._C._autograd._get_sequence_nr())
        self.instruments.backward_ended()

    def _grads_signature(self) -> tuple:
        """Identity and version of every tracked `.grad`: differs when something between two backwards
        set them to None, zeroed them (zero_grad) or changed them in place (clipping). Taken only around
        retain_graph=True backwards."""
        sig = []
        for t in self.targets.tracked:
            p = t.ref()
            g = None if p is None else p.grad
            sig.append(None if g is None else (id(g), getattr(g, "_version", None)))
        return tuple(sig)

    def _watch_changes(self, bw, counts) -> None:
        """Trigger a full capture of the next step when arrival changed or a non-finite value appeared."""
        sig = frozenset(bw.arrived)
        pos = len(self.sigs_now)
        self.sigs_now.append(sig)
        changed = pos < len(self.sigs) and self.sigs[pos] != sig
        if changed or counts.get("nonfinite"):
            self.schedule.trigger(self.clock.step + 1)
        if counts.get("nonfinite"):
            self.numerics.nonfinite_seen(bw.step)

    # --- tables ------------------------------------------------------------------
    def version(self):
        return (self.store.version, len(self.cutlog.cuts), sum(c.count for c in self.cutlog.cuts),
                len(self.limits))

    def tables(self) -> dict:
        from ..tables.schema import frame
        tables = {t: self.store.frame(t) for t in self.store.cols if t != "findings"}
        order = {t.name: t.index for t in self.targets.tracked}
        tables["cuts"] = frame("cuts", [c.row(order) for c in self.cutlog.cuts])
        tables["limits"] = frame("limits", [
            {"step": s, "what": what, "site": where, "note": LIMIT_NOTES.get(what, what), "count": n}
            for (what, where), (s, n) in self.limits.items()])
        tables["weights"] = frame("weights", [{"step": s, "param": n, "status": "nonfinite"}
                                              for n, s in self.bad_weights.items()])
        if self.memory is not None:
            self.memory.fill_tables(tables)
        tables.update(self.dist.tables())  # `dist`: only in a process group
        return tables
