"""Saved tensors through a `saved_tensors_hooks` pair (torch without node_creation_hook).

The probe's pack/unpack wrap the hooks that were active when it was installed (save_on_cpu,
offloading): those keep running exactly as often. Without such hooks `pack` keeps a detached alias
(shares storage and version counter, not the grad_fn), whose weak reference says when the graph
lets go of it; PyTorch skips its in-place version check while hooks are installed, so `unpack`
repeats it. The pair only comes off the stack when it is on top, and goes back only where the
stack is as it left it, so a checkpoint/save_on_cpu region opened meanwhile is never broken.
"""

from __future__ import annotations

import logging
import time
import weakref

import torch

from .memlog import BACKWARD, DROPPED, RETAINED

log = logging.getLogger("gradprobe")

_VERSION_ERROR = ("one of the variables needed for gradient computation has been modified by an inplace "
                  "operation: [{type} {shape}]{op} is at version {now}; expected version {saved} instead. "
                  "(Raised by gradprobe, which repeats PyTorch's check while its saved_tensors_hooks are "
                  "installed; see the probe's inplace_saved finding for the line that wrote it.)")


class _Token:
    """Stands for a tensor packed by the user's hooks: dies when the graph lets go of it."""

    __slots__ = ("__weakref__",)


class _Ref(weakref.ref):
    __slots__ = ("row",)


def _top():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


class HookPath:
    def __init__(self, c) -> None:
        self.c = c
        self.hooks = (self._pack, self._unpack)
        self.inner = None  # hooks active when the probe was installed
        self.ctx = None
        self.installed = False
        self.paused = False
        self.refs: dict[int, _Ref] = {}
        self.seq: dict[int, int] = {}  # row -> sequence number of the node that saved it (until named)  # row -> weak reference to its alias (alive rows only)

    def install(self):
        try:
            self.inner = _top()
            self.ctx = torch.autograd.graph.saved_tensors_hooks(*self.hooks)
            self.ctx.__enter__()
            self.installed, self.paused = True, False
        except Exception as e:  # e.g. inside disable_saved_tensors_hooks
            self.ctx = None
            return f"saved-tensor hooks could not be installed: {e}"
        return None

    def _top_is(self, pack) -> bool:
        top = _top()
        return top is None if pack is None else (top is not None and top[0] is pack)

    def pause(self) -> bool:
        if self.installed and not self.paused and self._top_is(self.hooks[0]):
            self.ctx.__exit__(None, None, None)
            self.paused = True
            return True
        return False

    def resume(self) -> None:
        # only where the stack is as we left it: never above a region opened since (it would pop us)
        if self.installed and self.paused and self._top_is(self.inner[0] if self.inner else None):
            self.ctx.__enter__()
            self.paused = False

    def remove(self) -> bool:
        if not self.installed:
            return False
        self.installed = False
        if self.paused:
            self.paused = False
            return True
        try:
            if self._top_is(self.hooks[0]):
                self.ctx.__exit__(None, None, None)
            else:
                log.warning("gradprobe: other saved_tensors_hooks were still installed above the probe's at exit; "
                            "left the stack as it is")
        except Exception as e:
            log.warning(f"gradprobe: could not remove saved-tensor hooks: {e!r}")
        return True

    def check_shadowed(self) -> None:
        if self.installed and not self.paused:
            top = _top()
            if top is not None and top[0] is not self.hooks[0]:
                self.c.shadowed_by(top[0])

    def op_names(self, grad_fn, start, end):
        """Rows start..end were saved by the nodes one op built (a composite op builds several): walk
        back from its output's node over the nodes made since, and name each row by its node."""
        seqs = [self.seq.pop(i, None) for i in range(start, end)]
        low = min((s for s in seqs if s is not None), default=None)
        outer = type(grad_fn).__name__
        names = {}
        if low is not None:
            stack, seen = [grad_fn], set()
            while stack and len(seen) < 10_000:
                n = stack.pop()
                if n is None or id(n) in seen:
                    continue
                seen.add(id(n))
                try:
                    s = n._sequence_nr()
                except Exception:
                    continue
                if s < low or type(n).__name__ == "AccumulateGrad":
                    continue
                names[s] = type(n).__name__
                stack.extend(f for f, _ in n.next_functions)
        by_row = dict(zip(range(start, end), seqs))
        return lambda i: names.get(by_row.get(i), outer)

    def on_data(self, t) -> None:
        pass

    def inplace_kind(self, row, t):
        r = self.refs.get(row)
        d = r() if r is not None else None
        if not isinstance(d, torch.Tensor):
            return None
        return "version" if d._version != self.c.log.version[row] else "data"

    # --- the hooks ---------------------------------------------------------------
    def _pack(self, t):
        inner = self.inner
        with torch._C.DisableTorchFunction():  # our own ops are not the user's (cuts, fast paths)
            d = t.detach() if inner is None else _Token()
            row = -1
            try:
                c = self.c
                bw, recompute = c.in_backward()
                if recompute:  # reentrant checkpoint recomputing in backward: not new memory of the step
                    c.recompute(bw)
                elif self.installed:
                    row = c.record(t)
                    if row >= 0:
                        self.seq[row] = torch._C._autograd._get_sequence_nr() - 1  # the node being built
                        r = _Ref(d, self._freed)
                        r.row = row
                        self.refs[row] = r
            except Exception:
                row = -1
        if inner is None:
            return (d, d._version, row)
        return (d, None, row, inner[1], inner[0](t))

    def _unpack(self, packed):
        d, version, row = packed[:3]
        if row >= 0:
            try:
                bw = self.c.probe.backwards.current()
                if bw is not None:
                    self.c.log.use(row, bw.index)
            except Exception:
                pass
        if len(packed) == 5:
            return packed[3](packed[4])
        if d._version != version:
            op = self.c.log.op[row] if row >= 0 else None
            raise RuntimeError(_VERSION_ERROR.format(type=d.type(), shape=list(d.shape), now=d._version,
                                                     saved=version, op=f", which was saved by {op}," if op else ""))
        return d

    def _freed(self, r) -> None:
        """The graph let go of a saved tensor (a backward released it, or the graph died)."""
        try:
            row = r.row
            self.refs.pop(row, None)
            c = self.c
            lg = c.log
            bw, in_backward = c.in_backward()
            if bw is not None:
                lg.use(row, bw.index)
                how = BACKWARD
            elif in_backward:  # a backward the probe does not watch (it ran after the probe exited)
                how = BACKWARD
            else:
                how = RETAINED if lg.first_bw[row] >= 0 else DROPPED
            lg.release(row, how, time.perf_counter() - c.probe.t0, c.probe.step_idx)
            c.probe.store.version += 1
        except Exception:
            pass
