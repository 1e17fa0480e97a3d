"""Backward interception: every `.backward()`, `torch.autograd.backward` and `torch.autograd.grad`.

The probe wraps the engine entry that all three call (`torch.autograd._engine_run_backward`),
so a `grad` imported before the probe started is seen too. State of a backward lives in a
`BackwardCall` found by thread: a backward started inside another (reentrant checkpoint's
recomputation) belongs to the outer one; hooks that fire on the engine's device threads find
the backward that is running. Backwards that are not the user's pass straight through:
AOTAutograd tracing them while compiling, and those inside torch.func transforms (said in the run).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time

import torch

from .handles import Patch
from .sites import site

log = logging.getLogger("gradprobe")


class BackwardCall:
    """One backward call while it runs, and what it found."""

    __slots__ = ("index", "step", "site", "api", "retain_graph", "create_graph", "detail", "arrived", "outs",
                 "considered", "inputs", "result", "t", "duration", "error", "root_tags", "thread",
                 "freed_graph", "carried_site")

    def __init__(self, index, step, site, api, retain_graph, create_graph, detail):
        self.index, self.step, self.site, self.api = index, step, site, api
        self.retain_graph, self.create_graph, self.detail = retain_graph, create_graph, detail
        self.arrived: list[int] = []  # tracked indices, in arrival order
        self.outs: list[tuple] = []  # (ModuleInfo, squared norm tensor): gradient at module outputs
        self.considered: list[int] | None = None  # None: every tracked tensor
        self.inputs = None  # autograd.grad / backward(inputs=...): the tensors asked for
        self.result = None  # autograd.grad: the gradients it returned
        self.t = 0.0
        self.duration = math.nan
        self.error: str | None = None
        self.root_tags = frozenset()
        self.thread = threading.get_ident()
        self.freed_graph: int | None = None  # a failed backward: the graph it reached that an earlier one freed
        self.carried_site: str | None = None  # the forward root call given a tensor of that graph


def _engine_target():
    """(owner, name) of the function every backward goes through."""
    if callable(getattr(torch.autograd, "_engine_run_backward", None)):
        return torch.autograd, "_engine_run_backward"
    return None


class Backwards:
    """Installs the interception; `current()` is the backward running now (or None)."""

    def __init__(self, begin, end, skipped) -> None:
        self._begin, self._end, self._skipped = begin, end, skipped
        self.by_thread: dict[int, BackwardCall] = {}
        self.orig = None

    def install(self) -> list:
        target = _engine_target()
        if target is not None:
            self.orig = getattr(*target)
            return [Patch(*target, self._engine)]
        # older torch: wrap the two public entries
        self.orig_backward, self.orig_grad = torch.autograd.backward, torch.autograd.grad
        return [Patch(torch.autograd, "backward", self._public_backward),
                Patch(torch.autograd, "grad", self._public_grad)]

    def current(self) -> BackwardCall | None:
        bws = self.by_thread
        if not bws:
            return None
        bw = bws.get(threading.get_ident())
        return bw if bw is not None else next(reversed(bws.values()))  # a hook on an engine device thread

    # --- entries ----------------------------------------------------------
    def _engine(self, t_outputs, *args, **kwargs):
        orig = self.orig
        if threading.get_ident() in self.by_thread:
            return orig(t_outputs, *args, **kwargs)  # inside a backward (reentrant checkpoint): the outer one's
        why = _not_users(t_outputs)
        if why is not None:
            self._skipped(why)
            return orig(t_outputs, *args, **kwargs)
        names = ("grad_tensors", "retain_graph", "create_graph", "inputs", "allow_unreachable", "accumulate_grad")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        accumulate = bool(bound.get("accumulate_grad", True))
        caller = sys._getframe(1)
        if accumulate:
            up = caller.f_back
            api = "tensor.backward" if up is not None and up.f_code is torch.Tensor.backward.__code__ \
                else "autograd.backward"
        else:
            api = "autograd.grad"
        create = bool(bound.get("create_graph", False))
        retain = bound.get("retain_graph")
        retain = create if retain is None else bool(retain)
        inputs = bound.get("inputs") or None
        return self._run(orig, (t_outputs,) + args, kwargs, api, t_outputs, inputs, retain, create)

    def _public_backward(self, *args, **kwargs):
        return self._public(self.orig_backward, args, kwargs, "backward")

    def _public_grad(self, *args, **kwargs):
        return self._public(self.orig_grad, args, kwargs, "grad")

    def _public(self, fn, args, kwargs, which):
        if threading.get_ident() in self.by_thread:
            return fn(*args, **kwargs)
        import inspect
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
        roots = bound.get("tensors" if which == "backward" else "outputs")
        roots = (roots,) if isinstance(roots, torch.Tensor) else tuple(roots or ())
        why = _not_users(roots)
        if why is not None:
            self._skipped(why)
            return fn(*args, **kwargs)
        create = bool(bound.get("create_graph", False))
        retain = bound.get("retain_graph")
        retain = create if retain is None else bool(retain)
        api = "autograd.grad" if which == "grad" else "autograd.backward"
        return self._run(fn, args, kwargs, api, roots, bound.get("inputs"), retain, create)

    def _run(self, fn, args, kwargs, api, roots, inputs, retain, create):
        roots = [roots] if isinstance(roots, torch.Tensor) else [r for r in (roots or ()) if
                                                                  isinstance(r, torch.Tensor)]
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs]
        elif inputs is not None:
            inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        bw = BackwardCall(None, None, site(3), api, retain, create, False)
        bw.inputs = inputs
        try:
            self._begin(bw, roots)
        except Exception as e:  # never break training because of the probe
            log.warning("gradprobe: could not prepare a backward: %r", e)
            return fn(*args, **kwargs)
        tid = bw.thread
        self.by_thread[tid] = bw
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            if api == "autograd.grad":
                bw.result = out
            return out
        except BaseException as e:
            bw.error = str(e) or type(e).__name__
            if "second time" in bw.error or "already been freed" in bw.error:
                _freed_graph(bw, roots)
            raise
        finally:
            bw.duration = time.perf_counter() - t0
            self.by_thread.pop(tid, None)
            try:
                self._end(bw, roots)
            except Exception as e:
                log.warning("gradprobe: could not record backward %s: %r", bw.index, e)


def _freed_graph(bw, roots, limit: int = 100_000) -> None:
    """A backward PyTorch refused because a graph was freed: note on `bw` the recorded graph it reached whose
    saved tensors an earlier backward released, and the forward whose graph was given a tensor of it (the
    nearest recorded graph above it). Walks the failed graph from its roots once; only plain ids and sites."""
    try:
        from .memlog import BACKWARD
        from .memops import KEY
        from collections import deque
        freed_by = None  # graph id -> an earlier backward released rows of it (hooks path: graph-level)
        queue = deque((r.grad_fn, None, None) for r in roots if r.grad_fn is not None)
        seen: set = set()
        while queue and len(seen) < limit:
            node, cur, prev = queue.popleft()  # cur: nearest recorded graph above, prev: the one above that
            if node is None or node in seen:
                continue
            seen.add(node)
            s = node.metadata.get(KEY)
            g = getattr(s, "graph", None)
            if g is not None:
                lg = s.c.log
                if freed_by is None:
                    freed_by = {lg.graph[i]: b for i in range(len(lg))
                                if lg.freed[i] == BACKWARD and (b := lg.last_bw[i]) >= 0 and b != bw.index}
                rows = getattr(s, "rows", None)
                hit = (any(lg.freed[i] == BACKWARD and 0 <= lg.last_bw[i] != bw.index for i in rows) if rows
                       else g.id in freed_by)
                if hit:
                    above = cur if cur is not g else prev
                    bw.freed_graph = g.id
                    bw.carried_site = above.site if above is not None else None
                    return
                if g is not cur:
                    cur, prev = g, cur
            queue.extend((nf, cur, prev) for nf, _ in node.next_functions)
    except Exception as e:  # the user's error is what matters: never replace it
        log.debug("gradprobe: freed graph walk: %r", e)


def _not_users(roots) -> str | None:
    """Why a backward is not the user's to record (None: it is)."""
    try:
        if torch.compiler.is_compiling():
            return "compile"
        functorch = torch._C._functorch
        for r in (roots if isinstance(roots, (list, tuple)) else (roots,)):
            if isinstance(r, torch.Tensor):
                if functorch.is_functorch_wrapped_tensor(r):
                    return "torch.func"
                if type(r) is not torch.Tensor and not isinstance(r, torch.nn.Parameter) and \
                        type(r).__name__ in ("FakeTensor", "FunctionalTensor"):
                    return "compile"
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            return "compile"
    except Exception:
        return None
    return None
