"""Autograd memory: every tensor saved for backward on sampled steps, how long the graph held it, and why.

Two ways to see saved tensors (one per torch version, both feed the same SavedLog):
- torch >= 2.14: `node_creation_hook` (savednodes.py) reads what each new node saved without
  installing saved-tensor hooks, so torch.func, checkpoint, save_on_cpu and the user's own hooks
  are untouched;
- older torch: a `saved_tensors_hooks` pair that wraps the hooks active before it (savedhooks.py).
Bytes are counted once per storage (a view keeps its whole storage alive). This file decides what a
saved storage is (parameter, buffer, input, activation, autocast cast), which graph it belongs to and
what the step's end finds still alive. It records only on detail steps; off them the capture is
removed and nothing is recorded per backward or step.
"""

from __future__ import annotations

import logging
import time

import torch

from .procmem import rss as _procmem_rss
from .graph import tensors_in
from .leaks import carried_in, leak_row
from .memlog import BACKWARD, DROPPED, RETAINED, SavedLog
from .memops import Inplace, after_op, inplace_write
from .savedkinds import Kinds, key_of, keys_of
from .sites import checkpoint_region, site

log = logging.getLogger("gradprobe")



class Sentinel:
    """Lives in a grad_fn's metadata: says when the node dies, and which saved rows it holds."""

    __slots__ = ("c", "graph", "rows", "__weakref__")

    def __init__(self, c, graph, rows=range(0)):
        self.c, self.graph, self.rows = c, graph, rows
        c.log.node_born(graph)

    def ran(self, grad_inputs, grad_outputs):
        """Post hook: the node ran in a backward; without retain_graph it releases what it saved."""
        try:
            self.c.node_ran(self.rows)
        except Exception:
            pass

    def __del__(self):
        try:
            self.c.node_died(self)
        except Exception:
            pass


class MemoryCollector:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.log = SavedLog()
        self.inplace = Inplace()
        self.kinds = Kinds(probe)
        self.group = None  # the graph being built now
        self.root_site: str | None = None  # site of the forward root call that starts the next graph
        self.assigned = 0  # rows before this one have their op
        self.shadowed: set = set()
        self.carry = None  # (site, -, step) of a forward root call given a tensor of an earlier step's graph
        self.step_seq = None  # autograd sequence number at the last step boundary: older nodes are older steps'
        self._holders: dict = {}
        self.root_keys: set = set()  # storages passed to the last forward root call (the model's inputs)
        self.recomputed: dict[int, int] = {}  # backward -> tensors saved again by checkpoint recomputation
        self.cuda = False
        self._last_leak = None
        self._capped = False
        self._shapes: dict = {}
        from .savednodes import NodePath, available
        if available():
            self.path = NodePath(self)
        else:
            from .savedhooks import HookPath
            self.path = HookPath(self)

    # --- install / remove ----------------------------------------------------
    def install(self) -> None:
        why = self.path.install()
        if why is not None:
            self._event("memory_off", note=why)
            return
        self.kinds.refresh()
        self._event("enter")

    def pause(self) -> bool:
        """Off detail steps: the capture comes off (graphs already recorded keep being followed)."""
        self.group = None
        return self.path.pause()

    def resume(self) -> None:
        self.path.resume()

    def remove(self) -> None:
        self.group = None
        if self.path.remove():
            self._event("exit", rss=True)

    # --- graphs ----------------------------------------------------------------
    def on_forward(self, module, args=()) -> None:
        """A forward root call (outermost tracked module): the next saved tensors form a new graph."""
        try:
            self.group = None
            self.root_site = site() if torch.is_grad_enabled() else None
            tensors = tensors_in(args)  # walked once: the root's inputs, and whether one is carried over
            self.root_keys = keys_of(tensors)
            p = self.probe
            if self.root_site is not None and carried_in(tensors, p.step_idx, self.step_seq):
                self.carry = (self.root_site, None, p.step_idx)
            self.path.check_shadowed()
        except Exception:
            pass

    def graph(self):
        g = self.group
        if g is not None:
            return g
        p = self.probe
        bw = p.backwards.current()
        if not p.busy:
            p.graph_activity()  # an optimizer step ended the step: this is the next step's first activity
        where = self.root_site or (bw.site if bw is not None else site())
        self.root_site = None
        g = self.group = self.log.new_graph(p.step_idx, where, time.perf_counter() - p.t0)
        if bw is None:
            self._event("forward", site=where)
        self.kinds.refresh()
        return g

    def in_backward(self):
        """(backward or None, whether this is a recomputation: a save inside a backward that builds no graph)."""
        bw = self.probe.backwards.current()
        if bw is not None:
            return bw, not bw.create_graph
        try:
            return None, torch._C._current_graph_task_id() != -1
        except Exception:
            return None, False

    def recompute(self, bw) -> None:
        if bw is not None:
            self.recomputed[bw.index] = self.recomputed.get(bw.index, 0) + 1

    # --- rows --------------------------------------------------------------------
    def record(self, t, op=None) -> int:
        """Row of a tensor just saved for backward (-1 when not recorded)."""
        lg = self.log
        if lg.full:
            if not self._capped:
                self._capped = True
                self._event("memory_off", note=f"saved-tensor rows capped at {len(lg):,}: later saves not recorded")
            return -1
        g = self.graph()
        p = self.probe
        now = time.perf_counter() - p.t0
        try:
            st = t.untyped_storage()
            nb, key = st.nbytes(), key_of(t, st.data_ptr())
            if t.is_cuda:
                self.cuda = True
        except Exception:  # sparse and other storage-less tensors: counted by their own size
            nb, key = t.nelement() * t.element_size(), None
        sid = lg.by_key.get(key) if key is not None and nb else None
        nbytes = 0
        if sid is None:
            kind, name = self.kinds.of(t, key)
            sid = lg.add_storage(nb, kind, name, g, now, key if nb else None)
            nbytes = nb
        shape = tuple(t.shape)
        s = self._shapes.get((shape, t.dtype, t.device))
        if s is None:
            s = self._shapes[(shape, t.dtype, t.device)] = (
                lg.s("x".join(map(str, shape)) or "scalar"), lg.s(str(t.dtype).replace("torch.", "")),
                lg.s(str(t.device)), t.nelement() * t.element_size())
        i = lg.add_row(p.step_idx, sid, nbytes, s[3], g, t._version, now, p.current_module(), s[0], s[1], s[2])
        if op is not None:
            lg.op[i] = op
        return i

    def node_ran(self, rows) -> None:
        bw, _ = self.in_backward()
        if bw is None or not rows:
            return
        lg = self.log
        now = time.perf_counter() - self.probe.t0
        for i in rows:
            lg.use(i, bw.index)
            if not bw.retain_graph:
                lg.release(i, BACKWARD, now, self.probe.step_idx)

    def node_died(self, sentinel) -> None:
        lg = self.log
        if sentinel.rows:
            self.released(sentinel.rows)
        lg.node_died(sentinel.graph)

    def released(self, rows) -> None:
        """The graph let go of these rows without a watched backward releasing them."""
        lg = self.log
        now = time.perf_counter() - self.probe.t0
        for i in rows:
            how = RETAINED if lg.first_bw[i] >= 0 else DROPPED
            lg.release(i, how, now, self.probe.step_idx)
        self.probe.store.version += 1

    # --- from the TorchFunctionMode (detail steps) ---------------------------------
    def on_op(self, func, args, kwargs, out) -> None:
        try:
            after_op(self, func, args, kwargs, out, Sentinel)
        except Exception:
            pass

    def on_inplace(self, func, args, kwargs) -> None:
        try:
            inplace_write(self, func, args, kwargs)
        except Exception:
            pass

    def on_data(self, t) -> None:
        self.path.on_data(t)

    def shadowed_by(self, pack) -> None:
        """Other saved_tensors_hooks took this graph's saved tensors: checkpoint's (the region is the user's
        `checkpoint(...)` call), save_on_cpu's or someone else's (the region is the line)."""
        p = self.probe
        owner = getattr(pack, "__module__", None) or ""
        hooks = ("checkpoint" if owner == "torch.utils.checkpoint" else
                 "save_on_cpu" if owner == "torch.autograd.graph" else "other")
        key = (p.step_idx, p.current_module(), id(pack))
        if key not in self.shadowed:
            self.shadowed.add(key)
            mod = key[1]
            where = (checkpoint_region(2) if hooks == "checkpoint" else None) or site()
            self._event("hooks_shadowed", site=where, note=None if mod is None else (mod or "the root module"),
                        hooks=hooks)

    # --- backward and steps -------------------------------------------------------
    def begin_backward(self, bw, roots) -> None:
        self.group = self.root_site = None
        self.assigned = len(self.log)
        if bw.detail:  # off detail steps nothing is recorded per backward (bounded host memory)
            self._event("backward_begin", site=bw.site, backward=bw.index)

    def end_backward(self, bw) -> None:
        try:
            self._end_backward(bw)
        except Exception as e:
            log.debug("gradprobe: memory end_backward: %r", e)

    def _end_backward(self, bw) -> None:
        self.group = self.root_site = None
        lg = self.log
        self.assigned = len(lg)
        used = lg.used.get(bw.index, ())
        n = self.recomputed.pop(bw.index, 0)
        if n:
            self._event("recompute", site=bw.site, backward=bw.index,
                        note=f"{n} tensors saved again by checkpoint recomputation (not counted as new)")
        if not bw.detail and not used:
            return  # not sampled, and it went through no recorded graph: its figures are missing
        held, retained, graphs = {}, {}, set()
        for i in used:
            sid = lg.storage[i]
            held[sid] = lg.s_nbytes[sid]
            if sid in lg.s_live:
                retained[sid] = lg.s_nbytes[sid]
            graphs.add(lg.graph[i])
        for gid in graphs:
            g = lg.graphs[gid]
            if bw.retain_graph and not bw.create_graph:
                g.retained_by = bw.site
            if bw.create_graph:
                g.created_by = bw.site
        lg.bw[bw.index] = {"saved": sum(held.values()), "retained": sum(retained.values()) if bw.retain_graph else 0,
                           "t_end": time.perf_counter() - self.probe.t0, "retain": bw.retain_graph,
                           "create": bw.create_graph, "site": bw.site, "step": bw.step}
        self._event("backward_end", site=bw.site, backward=bw.index)

    def end_step(self, step: int) -> None:
        """Step boundary: graphs of earlier steps still alive (a row when that changes, or on detail steps)."""
        try:
            self.group = self.root_site = None
            self.step_seq = torch._C._autograd._get_sequence_nr()
            row = leak_row(self.log, step, self.carry, self._holders)
            sig = (row.get("leaked_graphs"), row.get("leaked_nodes"), row.get("leaked_bytes"))
            if self.probe.detail or sig != self._last_leak:
                self._last_leak = sig
                self._event("step_end", rss=True, **row)
        except Exception as e:
            log.debug("gradprobe: memory end_step: %r", e)

    def merge_steps(self) -> None:
        self.log.merge_steps()
        self.carry = None

    def _event(self, event, site=None, backward=None, note=None, rss=False, **extra) -> None:
        p = self.probe
        row = {"t": time.perf_counter() - p.t0, "step": p.step_idx, "event": event, "site": site,
               "backward": backward, "note": note, "rss_bytes": _procmem_rss() if rss else None, **extra}
        if self.cuda and torch.cuda.is_available():
            try:
                row["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
                row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            except Exception:
                pass
        self.log.events.append(row)
        p.store.version += 1

    # --- tables ---------------------------------------------------------------
    def fill_tables(self, tables: dict) -> None:
        from ..tables.memory import fill
        p = self.probe
        try:
            fill(self.log, tables, now=(time.perf_counter() - p.t0, p.step_idx) if p.depth > 0 else None)
        except Exception as e:  # never break reading the other tables
            log.warning(f"gradprobe: could not build the memory tables: {e!r}")



