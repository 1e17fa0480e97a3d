"""Autograd memory: every tensor saved for backward, how long the graph held it, and why.

A saved_tensors_hooks pair sees each tensor autograd saves. `pack` returns
`(t.detach(), version, index)`: the detached copy shares storage and version
counter with `t` but not its grad_fn (returning `t` itself would make a cycle
for saved outputs), and a weak reference to it says when the graph lets go of
it. While hooks are installed PyTorch skips its own in-place version check, so
`unpack` repeats it. Bytes are counted once per storage (a view keeps its
whole storage alive). Graph nodes get a small sentinel in `grad_fn.metadata`
whose `__del__` says when the graph itself dies (nodes cannot be weak-referenced).
The collector holds numbers, names and weak references only.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref

import numpy as np
import pandas as pd
import torch

from ..schema import TABLES, frame
from ..text import span
from .sites import site

_KEY = "gradprobe.graph"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_NOT_WRITES = {"requires_grad_", "detach_", "share_memory_", "set_", "retain_grad", "register_hook",
               "pin_memory_", "resize_", "resize_as_", "grad_", "_fix_weakref"}
_VERSION_ERROR = ("one of the variables needed for gradient computation has been modified by an inplace "
                  "operation: [{type} {shape}]{op} is at version {now}; expected version {saved} instead. "
                  "(Raised by gradprobe, which repeats PyTorch's check while its saved_tensors_hooks are "
                  "installed; see the probe's inplace_saved finding for the line that wrote it.)")

_STATM = None

log = logging.getLogger("gradprobe")


def _rss():
    """Process RSS: /proc/self/statm where there is one (psutil costs ~100 us a call in a busy loop)."""
    global _STATM
    try:
        if _STATM is None:
            _STATM = os.open("/proc/self/statm", os.O_RDONLY) if os.path.exists("/proc/self/statm") else -1
        if _STATM >= 0:
            return int(os.pread(_STATM, 128, 0).split()[1]) * _PAGE
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:
        return None


class _Inplace(dict):
    """func -> True when it writes into its first argument (mul_, __setitem__, copy_, ...)."""

    def __missing__(self, func):
        name = getattr(func, "__name__", "") or ""
        v = (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES) or name in (
            "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
            "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__")
        self[func] = v
        return v


class _Token:
    """Stands for a saved tensor packed by the user's hooks: dies when the graph lets go of it."""

    __slots__ = ("__weakref__",)


class _Ref(weakref.ref):
    __slots__ = ("idx",)


class _Group:
    """The graph one forward built (from a root module call, or from the first op after a boundary)."""

    __slots__ = ("id", "step", "site", "t", "nodes", "entries", "live", "live_bytes")

    def __init__(self, id, step, site, t):
        self.id, self.step, self.site, self.t = id, step, site, t
        self.nodes = 0  # live graph nodes (with our sentinel)
        self.entries: list[int] = []  # saved entries
        self.live = 0  # saved entries still held
        self.live_bytes = 0  # bytes of non-parameter storages this group opened and still holds


class _Node:
    """Sentinel in a grad_fn's metadata: dies with the node and tells its group."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group
        group.nodes += 1

    def __del__(self):
        self.group.nodes -= 1


class _Storage:
    """A storage held by saved tensors, from the first save to the last release."""

    __slots__ = ("id", "key", "nbytes", "kind", "refs", "group", "t0", "t1", "live", "all", "param")

    def __init__(self, id, key, nbytes, kind, group, t0, param):
        self.id, self.key, self.nbytes, self.kind, self.group, self.t0 = id, key, nbytes, kind, group, t0
        self.param = param
        self.refs = 0
        self.t1 = None  # released
        self.live: list[int] = []  # entries holding it now
        self.all: list[int] = []


class _Entry:
    """One tensor saved for backward (a row of the saved table)."""

    __slots__ = ("storage", "group", "step", "module", "op", "func", "shape", "dtype", "device", "version", "t",
                 "t_freed", "freed_by", "free_bw", "free_group", "free_step", "used", "nbytes",
                 "inplace_site", "inplace_kind", "inplace_t")


class MemoryCollector:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.entries: list[_Entry] = []
        self.storages: dict = {}  # key -> live _Storage
        self.all_storages: list[_Storage] = []
        self.groups: list[_Group] = []
        self.open_groups: list[_Group] = []
        self.group: _Group | None = None  # the graph being built now
        self.root_site: str | None = None  # site of the forward root that started it
        self.refs: dict[int, _Ref] = {}
        self.assigned = 0  # entries before this index have their op
        self.events: list[dict] = []
        self.bw: dict[int, dict] = {}  # backward index -> figures
        self.bw_used: dict[int, list[int]] = {}
        self.bridges: list[tuple] = []  # (site, old step, new step)
        self.shadowed: set = set()
        self.param_keys: dict = {}
        self._n_tracked = -1
        self.inplace = _Inplace()
        self.cuda = False
        self.installed = False
        self.paused = False
        self.ctx = None
        self.hooks = (self._pack, self._unpack)
        self.inner = None

    # --- install / remove ----------------------------------------------------
    def install(self) -> None:
        try:
            # hooks the user installed before the probe (save_on_cpu, offloading): ours call theirs
            self.inner = torch._C._autograd._top_saved_tensors_default_hooks(False)
            self.ctx = torch.autograd.graph.saved_tensors_hooks(*self.hooks)
            self.ctx.__enter__()
            self.installed = True
            self._n_tracked = -1  # parameters may have moved since the last `with` (model.to(), .data =)
        except Exception as e:  # e.g. inside disable_saved_tensors_hooks: record that memory is not tracked
            self.ctx = None
            self._event("memory_off", note=f"saved-tensor hooks could not be installed: {e}")
            return
        self._refresh_params()
        self._event("enter")

    def pause(self) -> bool:
        """Off detail steps (every=N) nothing is saved through our hooks: take them off the stack.

        Graphs saved earlier keep their own pack/unpack pair, so their accounting goes on.
        Returns whether it took them off now.
        """
        if self.installed and not self.paused and self._ours_on_top():
            self.ctx.__exit__(None, None, None)
            self.paused = True
            self.group = None
            return True
        return False

    def resume(self) -> None:
        if self.installed and self.paused:
            self.ctx.__enter__()
            self.paused = False

    def _ours_on_top(self) -> bool:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        return top is not None and top[0] is self.hooks[0]

    def remove(self) -> None:
        if not self.installed:
            return
        self.installed = False
        self.group = None
        if self.paused:
            self.paused = False
            return
        try:
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            if top is not None and top[0] is self.hooks[0]:
                self.ctx.__exit__(None, None, None)
            else:
                log.warning("gradprobe: other saved_tensors_hooks were still installed above the probe's at exit; "
                              "left the stack as it is")
        except Exception as e:
            log.warning(f"gradprobe: could not remove saved-tensor hooks: {e!r}")
        try:
            self._event("exit", rss=True)
        except Exception:
            pass

    def _refresh_params(self) -> None:
        """Storage key -> name of tracked parameters (a saved view of a weight is matched by storage)."""
        tracked = self.probe.targets.tracked
        if len(tracked) == self._n_tracked:
            return
        self._n_tracked = len(tracked)
        keys = {}
        for t in tracked:
            p = t.ref()
            if p is not None and t.kind == "parameter":
                try:
                    st = p.untyped_storage()
                    keys[_key(st.data_ptr(), p)] = t.name
                except Exception:
                    pass
        self.param_keys = keys

    # --- groups ----------------------------------------------------------------
    def on_forward(self, module) -> None:
        """A forward root call (outermost tracked module): the next saved tensors form a new graph."""
        try:
            self.group = None
            self.root_site = site() if torch.is_grad_enabled() else None
            self._check_shadowed()
        except Exception:
            pass

    def _new_group(self) -> _Group:
        p = self.probe
        bw = p.backwards.current()
        if not p.busy:
            p.graph_activity()  # an optimizer step ended the step: this is the next step's first activity
        where = self.root_site or (bw.site if bw is not None else site())
        self.root_site = None
        g = _Group(len(self.groups), p.step_idx, where, time.perf_counter() - p.t0)
        self.groups.append(g)
        self.open_groups.append(g)
        self.group = g
        if bw is None:
            self._event("forward", site=where)
        self._refresh_params()
        return g

    # --- hooks -----------------------------------------------------------------
    def _pack(self, t):
        inner = self.inner
        with torch._C.DisableTorchFunction():  # our own ops are not the user's (cuts, fast paths)
            # without other hooks we keep a detached alias (its weak reference says when the graph lets
            # go, and unpack repeats PyTorch's version check); wrapping the user's hooks we keep a token
            d = t.detach() if inner is None else _Token()
            bw = self.probe.backwards.current()
            try:
                # saves made during a backward belong to a recompute (reentrant checkpoint), unless the
                # backward builds a graph of its own (create_graph)
                idx = self._record(t, d) if self.installed and (bw is None or bw.create_graph) else -1
            except Exception:
                idx = -1
        if inner is None:
            return (d, d._version, idx)
        return (d, None, idx, inner[0](t))

    def _record(self, t, d) -> int:
        g = self.group or self._new_group()
        p = self.probe
        now = time.perf_counter() - p.t0
        try:
            st = t.untyped_storage()
            nb = st.nbytes()
            key = st.data_ptr()
            if t.is_cuda:
                key = (key, t.get_device())
                self.cuda = True
        except Exception:  # sparse and other storage-less tensors: counted by their own size
            nb, key = t.nelement() * t.element_size(), None
        s = self.storages.get(key) if key is not None and nb else None
        idx = len(self.entries)
        if s is None:
            param = self.param_keys.get(key)
            if param is not None:
                kind = "parameter"
            else:
                base = t
                if not t.is_leaf and t._is_view():
                    base = t._base
                if not base.is_leaf:
                    kind = "activation"
                    cast = _cast_of(base, p.targets.by_tensor)
                    if cast is not None:
                        kind, param = "cast", cast
                elif base.requires_grad:
                    tr = p.targets.by_tensor.get(base)
                    named = p.targets.leaf_names.get(base) if p.discover and tr is None else None
                    if tr is not None or named is not None or isinstance(base, torch.nn.Parameter):
                        kind, param = "parameter", tr.name if tr is not None else named
                    else:
                        kind = "input"  # a user tensor that wants a gradient, not a parameter
                else:
                    kind = "input?"  # an argument of the op (input) or made inside it (activation): see on_op
            s = _Storage(len(self.all_storages), key, nb, kind, g, now, param)
            self.all_storages.append(s)
            if key is not None and nb:
                self.storages[key] = s
            if kind != "parameter":
                g.live_bytes += nb
            nbytes = nb
        else:
            nbytes = 0
        s.refs += 1
        s.live.append(idx)
        s.all.append(idx)
        e = _Entry()
        e.storage, e.group, e.step, e.module, e.shape, e.dtype, e.device = \
            s, g, p.step_idx, p.current_module(), t.shape, t.dtype, t.device
        e.version, e.t, e.used, e.nbytes = t._version, now, [], nbytes
        e.op = e.func = e.t_freed = e.freed_by = e.free_bw = e.free_group = e.free_step = None
        e.inplace_site = e.inplace_kind = e.inplace_t = None
        self.entries.append(e)
        g.entries.append(idx)
        g.live += 1
        r = _Ref(d, self._on_free)
        r.idx = idx
        self.refs[idx] = r
        return idx

    def _unpack(self, packed):
        d, version, idx = packed[:3]
        if idx >= 0:
            bw = self.probe.backwards.current()
            if bw is not None:
                self._use(idx, bw.index)
        if len(packed) == 4:
            return self.inner[1](packed[3])
        if d._version != version:
            op = self.entries[idx].op if idx >= 0 else None
            raise RuntimeError(_VERSION_ERROR.format(type=d.type(), shape=list(d.shape), now=d._version,
                                                     saved=version, op=f", which was saved by {op}," if op else ""))
        return d

    def _use(self, idx: int, b: int) -> None:
        used = self.entries[idx].used
        if not used or used[-1] != b:
            used.append(b)
            self.bw_used.setdefault(b, []).append(idx)

    def _on_free(self, r) -> None:
        """The graph let go of a saved tensor (backward released it, or the graph died)."""
        try:
            idx = r.idx
            self.refs.pop(idx, None)
            e = self.entries[idx]
            p = self.probe
            now = time.perf_counter() - p.t0
            bw = p.backwards.current()
            e.t_freed = now
            e.free_step = p.step_idx
            if bw is not None:
                self._use(idx, bw.index)
                e.freed_by, e.free_bw = "backward", bw.index
            elif _in_backward():  # a backward the probe does not watch (it ran after the probe exited)
                e.freed_by = "backward"
            else:
                e.freed_by = "retained" if e.used else "graph_dropped"
                e.free_group = self.group.id if self.group is not None else None
            s = e.storage
            s.refs -= 1
            try:
                s.live.remove(idx)
            except ValueError:
                pass
            if s.refs <= 0:
                s.t1 = now
                if s.key is not None and self.storages.get(s.key) is s:
                    del self.storages[s.key]
                if s.kind != "parameter":
                    s.group.live_bytes -= s.nbytes
            e.group.live -= 1
            p.store.version += 1
        except Exception:
            pass

    # --- from the TorchFunctionMode ------------------------------------------------
    def on_op(self, func, args, kwargs, out) -> None:
        """After an op whose output requires grad: name what it saved, mark its graph node."""
        if self.paused:
            return
        try:
            self._on_op(func, args, kwargs, out)
        except Exception:
            pass

    def _on_op(self, func, args, kwargs, out) -> None:
        o = out if isinstance(out, torch.Tensor) else next(
            (x for x in out if isinstance(x, torch.Tensor) and x.requires_grad), None)
        gf = o.grad_fn if o is not None else None
        if gf is None:
            return
        n = len(self.entries)
        if self.assigned < n:
            op, name = type(gf).__name__, getattr(func, "__name__", None)
            arg_keys = None
            for e in self.entries[self.assigned:n]:
                e.op, e.func = op, name
                s = e.storage
                if s.kind == "input?":
                    if arg_keys is None:
                        arg_keys = _arg_keys(args, kwargs)
                    s.kind = "input" if s.key in arg_keys else "activation"
            self.assigned = n
        meta = gf.metadata
        if _KEY in meta:
            return
        g = self.group or self._new_group()
        p = self.probe
        if not p.modules.tracked_depth():  # outside model code (loss, accumulation): does this op join graphs of two steps?
            cur = p.step_idx
            for nf, _ in gf.next_functions:
                if nf is not None:
                    sn = nf.metadata.get(_KEY)
                    if sn is not None and sn.group.step < cur:
                        self.bridges.append((site(), sn.group.step, cur, time.perf_counter() - p.t0))
                        break
        meta[_KEY] = _Node(g)
        self._check_shadowed()

    def _check_shadowed(self) -> None:
        """Other saved_tensors_hooks on top of ours (checkpoint, save_on_cpu) take the saved tensors."""
        if not self.installed:
            return
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is not None and top[0] is not self.hooks[0]:
            self._shadowed(id(top[0]))

    def _shadowed(self, hook_id) -> None:
        p = self.probe
        key = (p.step_idx, p.current_module(), hook_id)
        if key in self.shadowed:
            return
        self.shadowed.add(key)
        mod = key[1]
        self._event("hooks_shadowed", site=site(), note=None if mod is None else (mod or "the root module"))

    def on_inplace(self, func, args, kwargs) -> None:
        """An op wrote into a tensor: flag saved tensors on that storage (except what this op saved)."""
        try:
            targets = []
            a = args[0] if args else None
            if isinstance(a, torch.Tensor):
                targets.append(a)
            elif isinstance(a, (list, tuple)):
                targets += [x for x in a if isinstance(x, torch.Tensor)]
            o = kwargs.get("out")
            if isinstance(o, torch.Tensor):
                targets.append(o)
            where = None
            for t in targets:
                s = self.storages.get(_key(t.untyped_storage().data_ptr(), t))
                if s is None:
                    continue
                for idx in s.live:
                    if idx >= self.assigned:
                        continue  # saved by this very op (e.g. relu_ saves its result)
                    e = self.entries[idx]
                    r = self.refs.get(idx)
                    d = r() if r is not None else None
                    if d is None or e.inplace_site is not None:
                        continue
                    if where is None:
                        where = site()
                    e.inplace_site = where
                    e.inplace_kind = "version" if d._version != e.version else "data"
                    e.inplace_t = time.perf_counter() - self.probe.t0
                    self.probe.store.version += 1
        except Exception:
            pass

    # --- backward and steps -------------------------------------------------------
    def begin_backward(self, bw, roots) -> None:
        try:
            self.group = None
            self.root_site = None
            self.assigned = len(self.entries)
            if bw.detail:  # off detail steps nothing is recorded per backward (bounded host memory)
                self._event("backward_begin", site=bw.site, backward=bw.index)
        except Exception:
            pass

    def end_backward(self, bw) -> None:
        try:
            self.group = None
            self.root_site = None
            self.assigned = len(self.entries)
            used = self.bw_used.get(bw.index, ())
            if not bw.detail and not used:
                return  # not sampled, and it went through no recorded graph: its figures are missing
            held, retained = {}, {}
            for idx in used:
                e = self.entries[idx]
                held[e.storage.id] = e.storage.nbytes
                if e.t_freed is None:
                    retained[e.storage.id] = e.storage.nbytes
            self.bw[bw.index] = {"saved": sum(held.values()),
                                 "retained": sum(retained.values()) if bw.retain_graph else 0,
                                 "t_end": time.perf_counter() - self.probe.t0, "retain": bw.retain_graph,
                                 "create": bw.create_graph, "site": bw.site, "step": bw.step}
            self._event("backward_end", site=bw.site, backward=bw.index)
        except Exception:
            pass

    def end_step(self, step: int) -> None:
        """Step boundary: record process memory and graphs of earlier steps that are still alive."""
        try:
            self.group = self.root_site = None
            self.open_groups = [g for g in self.open_groups if g.nodes > 0 or g.live > 0]
            leaked = [g for g in self.open_groups if g.step < step - 1 or (g.step < step and g.live_bytes > 0)]
            row = {}
            if leaked:
                row = {"leaked_graphs": len(leaked), "leaked_nodes": sum(g.nodes for g in leaked),
                       "leaked_bytes": sum(g.live_bytes for g in leaked)}
                steps = sorted({g.step for g in leaked})
                in_steps = set(steps)
                oldest = min(leaked, key=lambda g: g.step)
                bridge = next((b for b in reversed(self.bridges) if b[1] in in_steps), None)
                retain = self._retaining_backward(leaked)
                if bridge is not None:
                    row.update(leak_site=bridge[0], leak_cause="accumulation")
                elif retain is not None:
                    row.update(leak_site=retain, leak_cause="retain_graph")
                else:
                    row.update(leak_site=oldest.site, leak_cause="reference")
                row["note"] = span(steps, "step")
            if row or self.probe.detail or self.open_groups:  # a step not sampled, with nothing alive: no row
                self._event("step_end", rss=True, **row)
        except Exception:
            pass

    def merge_steps(self) -> None:
        """The probe folded the steps so far into step 0 (the first iteration): follow it."""
        for e in self.entries:
            e.step = 0
            if e.free_step is not None:
                e.free_step = 0
        for g in self.groups:
            g.step = 0
        for ev in self.events:
            ev["step"] = 0
        for b in self.bw.values():
            b["step"] = 0
        self.bridges = []  # both sides are now the same step: nothing bridges steps

    def _retaining_backward(self, groups):
        for g in groups:
            for idx in g.entries:
                e = self.entries[idx]
                if e.t_freed is None and e.used:
                    info = self.bw.get(e.used[-1])
                    if info is not None and info["retain"]:
                        return info["site"]
        return None

    def _event(self, event, site=None, backward=None, note=None, rss=False, **extra) -> None:
        p = self.probe
        row = {"t": time.perf_counter() - p.t0, "step": p.step_idx, "event": event, "site": site,
               "backward": backward, "note": note, "rss_bytes": _rss() if rss else None, **extra}
        if self.cuda and torch.cuda.is_available():
            try:
                row["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
                row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            except Exception:
                pass
        self.events.append(row)
        p.store.version += 1

    # --- tables ---------------------------------------------------------------
    def fill_tables(self, tables: dict) -> None:
        try:
            self._fill(tables)
        except Exception as e:  # never break reading the other tables
            log.warning(f"gradprobe: could not build the memory tables: {e!r}")

    def _cf_end(self, e: _Entry) -> float:
        """When the entry would have been released had its graph been freed at its first backward."""
        end = math.inf if e.t_freed is None else e.t_freed
        if e.used:
            info = self.bw.get(e.used[0])
            if info is not None:
                end = min(end, info["t_end"])
        return end

    def _fill(self, tables: dict) -> None:
        entries = self.entries
        self._retain_budget = 100  # retain_saving_bytes for the first 100 retaining backwards (each is O(n))
        cols = {c: [] for c in ("step", "module", "op", "nbytes", "kind", "freed_by", "func", "param", "shape",
                                "dtype", "device", "storage", "storage_bytes", "view_bytes", "alloc_bytes",
                                "graph", "site", "t_saved", "t_freed", "backward", "last_backward",
                                "inplace_site", "inplace_kind", "inplace_backward")}
        for e in entries:
            s = e.storage
            inplace_bw = None
            if e.inplace_t is not None:
                inplace_bw = next((b for b in e.used if self.bw.get(b, {}).get("t_end", 0) > e.inplace_t), None)
            kind = "input" if s.kind == "input?" else s.kind
            cuda = e.device.type == "cuda"
            for c, v in (("step", e.step), ("module", e.module), ("op", e.op), ("nbytes", e.nbytes),
                         ("kind", kind), ("freed_by", e.freed_by or "alive"), ("func", e.func), ("param", s.param),
                         ("shape", "x".join(map(str, e.shape)) or "scalar"), ("dtype", str(e.dtype).replace("torch.", "")),
                         ("device", str(e.device)), ("storage", s.id), ("storage_bytes", s.nbytes),
                         ("view_bytes", math.prod(e.shape) * e.dtype.itemsize),
                         ("alloc_bytes", -(-e.nbytes // 512) * 512 if cuda else None),
                         ("graph", e.group.id), ("site", e.group.site), ("t_saved", e.t),
                         ("t_freed", math.nan if e.t_freed is None else e.t_freed),
                         ("backward", e.used[0] if e.used else None),
                         ("last_backward", e.used[-1] if e.used else None),
                         ("inplace_site", e.inplace_site), ("inplace_kind", e.inplace_kind),
                         ("inplace_backward", inplace_bw)):
                cols[c].append(v)
        tables["saved"] = frame("saved", cols)

        # storage intervals: actual, and counterfactual (each graph freed at its first backward: the
        # union of its entries' shortened intervals, since a later forward may save the storage again)
        n = len(self.all_storages)
        t0 = np.empty(n)
        t1 = np.empty(n)
        nb = np.empty(n, dtype=np.int64)
        act = np.empty(n, dtype=bool)
        for i, s in enumerate(self.all_storages):
            t0[i] = s.t0
            t1[i] = math.inf if s.t1 is None else s.t1
            nb[i] = s.nbytes
            act[i] = s.kind == "activation"
        tl = _Timeline(t0, t1, nb)
        tl_cf = self._union(self.all_storages, self._cf_end)
        tl_act = _Timeline(t0[act], t1[act], nb[act])

        events = list(self.events)
        p = self.probe
        if p.depth > 0:
            events.append({"t": time.perf_counter() - p.t0, "step": p.step_idx, "event": "now"})
        times = np.array([r["t"] for r in events], dtype=float)
        live, peak = tl.at(times)
        live_cf, peak_cf = tl_cf.at(times)
        live_act, _ = tl_act.at(times)
        for r, a, b, c, d, f in zip(events, live, peak, live_cf, peak_cf, live_act):
            r.update(live_saved_bytes=int(a), peak_saved_bytes=int(b), counterfactual_saved_bytes=int(c),
                     peak_counterfactual_bytes=int(d), live_activation_bytes=int(f))
        tables["memory"] = frame("memory", events)

        # backward: saved and retained bytes, and what the retained graph was good for
        bwt = tables.get("backward")
        if bwt is not None and len(bwt):
            extra = {c: [] for c in ("saved_bytes", "retained_bytes", "reused_by", "retained_until",
                                     "released_by", "retain_saving_bytes", "retain_peak_saving_bytes")}
            for b in bwt["backward"].tolist():
                info = self.bw.get(b)
                vals = dict.fromkeys(extra)
                if info is not None:
                    vals["saved_bytes"], vals["retained_bytes"] = info["saved"], info["retained"]
                    if info["retain"] and info["retained"]:
                        vals.update(self._retain_info(b, info, tl))
                for c in extra:
                    extra[c].append(vals[c])
            for c, v in extra.items():
                bwt[c] = _typed("backward", c, v)

        # modules: bytes each module's forward saved for each backward (module and its children)
        mods = tables.get("modules")
        if mods is not None and len(mods):
            per_bw: dict[int, dict] = {}
            out = []
            for b, m in zip(mods["backward"].tolist(), mods["module"].tolist()):
                direct = per_bw.get(b)
                if direct is None:
                    direct, seen = {}, set()
                    for idx in self.bw_used.get(b, ()):
                        s = entries[idx].storage
                        if s.id not in seen:  # a storage counts for the module that first saved it
                            seen.add(s.id)
                            owner = entries[s.all[0]].module
                            direct[owner] = direct.get(owner, 0) + s.nbytes
                    per_bw[b] = direct
                out.append(sum(v for k, v in direct.items() if k is not None and (
                    m == "" or k == m or k.startswith(m + "."))))
            mods["saved_bytes"] = _typed("modules", "saved_bytes", out)

    def _union(self, storages, end_of) -> "_Timeline":
        """Bytes of each storage over the union of its entries' [saved, end_of(entry)) intervals."""
        c0, c1, cn = [], [], []
        entries = self.entries
        for s in storages:
            spans = sorted((entries[j].t, end_of(entries[j])) for j in s.all)
            if not spans:
                continue
            a, b = spans[0]
            for x, y in spans[1:]:
                if x > b:
                    c0.append(a), c1.append(b), cn.append(s.nbytes)
                    a, b = x, y
                else:
                    b = max(b, y)
            c0.append(a), c1.append(b), cn.append(s.nbytes)
        return _Timeline(np.array(c0, dtype=float), np.array(c1, dtype=float), np.array(cn, dtype=np.int64))

    def _retain_info(self, b: int, info: dict, tl: "_Timeline") -> dict:
        """For a backward with retain_graph=True: who reused the graph, when it went, the peak it cost."""
        end = info["t_end"]
        kept = [self.entries[i] for i in self.bw_used.get(b, ()) if
                self.entries[i].t_freed is None or self.entries[i].t_freed > end]
        later = [u for e in kept for u in e.used if u > b]
        out = {"reused_by": min(later) if later else None}
        alive = [e for e in kept if e.t_freed is None]
        if alive:
            out["retained_until"], out["released_by"] = math.nan, "alive"
        elif kept:
            last = max(kept, key=lambda e: e.t_freed)
            out["retained_until"] = last.t_freed
            if last.freed_by == "backward":
                out["released_by"] = f"backward {last.free_bw}"
            else:
                g = self.groups[last.free_group] if last.free_group is not None else None
                out["released_by"] = (f"the graph was dropped in step {last.free_step}" +
                                      (f", during the forward at {g.site}" if g is not None and g.site else ""))
        if kept and self._retain_budget > 0:  # the peak had this backward freed what it used
            self._retain_budget -= 1
            cut = {id(e) for e in kept}

            def end_of(e):
                t = math.inf if e.t_freed is None else e.t_freed
                return min(t, end) if id(e) in cut else t

            until = max((math.inf if e.t_freed is None else e.t_freed) for e in kept)
            less = self._union(self.all_storages, end_of)
            out["retain_saving_bytes"] = tl.peak_in(end, until) - less.peak_in(end, until)
            out["retain_peak_saving_bytes"] = tl.peak() - less.peak()
        return out


class _Timeline:
    """Sum of bytes of intervals [t0, t1) as a step function; exact values and peaks between times."""

    def __init__(self, t0, t1, nb):
        self.t0, self.t1, self.nb = t0, t1, nb
        ts = np.concatenate([t0, t1])
        ds = np.concatenate([nb, -nb])
        order = np.lexsort((ds, ts))  # at equal times releases first
        self.ts = ts[order]
        self.vals = np.cumsum(ds[order]) if len(ds) else np.zeros(0, dtype=np.int64)

    def peak(self) -> int:
        return int(self.vals.max()) if len(self.vals) else 0

    def peak_in(self, a: float, b: float) -> int:
        """Largest value over [a, b]."""
        if len(self.ts) == 0:
            return 0
        vals = np.concatenate([[0], self.vals])
        i = np.searchsorted(self.ts, a, side="right")
        j = np.searchsorted(self.ts, b, side="right")
        return int(vals[i:j + 1].max())

    def at(self, times):
        """Values at each time, and the peak over (previous time, time]."""
        if len(self.ts) == 0:
            z = np.zeros(len(times), dtype=np.int64)
            return z, z
        pos = np.searchsorted(self.ts, times, side="right")  # change points <= t
        vals = np.concatenate([[0], self.vals])
        now = vals[pos]
        peaks = np.empty(len(times), dtype=np.int64)
        prev = 0
        for i, k in enumerate(pos):
            seg = vals[prev:k + 1]
            peaks[i] = seg.max() if len(seg) else now[i]
            prev = k
        return now, peaks


def _typed(table, col, values):
    """A column of `values` with the schema's dtype for table.col."""
    spec = TABLES[table][col]
    return pd.Series(values, dtype="float64" if spec == "float64" else spec).values


def _cast_of(t, by_tensor):
    """Name of the parameter `t` is a dtype copy of (autocast's weight cast), else None."""
    gf = t.grad_fn
    if gf is None or type(gf).__name__ != "ToCopyBackward0":
        return None
    nxt = gf.next_functions
    var = getattr(nxt[0][0], "variable", None) if nxt and nxt[0][0] is not None else None
    tr = by_tensor.get(var) if var is not None else None
    return tr.name if tr is not None else None


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:
        return False


def _key(ptr: int, t):
    return ptr if not t.is_cuda else (ptr, t.get_device())


def _arg_keys(args, kwargs) -> set:
    keys = set()
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            try:
                keys.add(_key(a.untyped_storage().data_ptr(), a))
            except Exception:
                pass
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
    return keys


