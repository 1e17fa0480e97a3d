"""The memory collector's records: plain numbers and names, never tensors.

Saved tensors of sampled (detail) steps are rows in columns (`array` for numbers, lists of shared
strings), at most `CAP` of them; storages and graphs likewise. Live sets are dicts, so releasing a
saved tensor is O(1) however often its storage was saved. Graphs alive are counted per step, so the
leak check at each step's end costs O(graphs of the last two steps), not O(run length).
Nothing here touches torch: the capture paths feed it, gradprobe.tables.memory reads it.
"""

from __future__ import annotations

import math
from array import array
from collections import deque

CAP = 200_000  # saved-tensor rows kept per run (about 150 bytes each)
ALIVE, BACKWARD, RETAINED, DROPPED = range(4)  # `freed` codes (named in gradprobe.tables.memory.FREED)


class Graph:
    """The graph one forward built: live nodes, live saved rows and their non-parameter bytes."""

    __slots__ = ("id", "step", "site", "t", "nodes", "live", "live_bytes", "retained_by", "created_by")

    def __init__(self, id, step, site, t):
        self.id, self.step, self.site, self.t = id, step, site, t
        self.nodes = 0
        self.live = 0
        self.live_bytes = 0
        self.retained_by = None  # site of a retain_graph=True backward that went through it
        self.created_by = None  # site of a create_graph=True backward that went through it


class SavedLog:
    def __init__(self) -> None:
        # rows: one per saved tensor
        self.step, self.storage, self.nbytes, self.view, self.graph = (array("q") for _ in range(5))
        self.version, self.first_bw, self.last_bw = array("q"), array("q"), array("q")
        self.freed = array("b")
        self.t, self.t_freed = array("d"), array("d")
        self.free_step = array("q")
        self.module: list = []
        self.op: list = []
        self.func: list = []
        self.shape: list = []
        self.dtype: list = []
        self.device: list = []
        self.inplace: dict[int, tuple] = {}  # row -> (site, kind, t)
        self.full = False
        # storages: one per storage from its first save to its last release
        self.s_nbytes, self.s_graph, self.s_first = array("q"), array("q"), array("q")
        self.s_t0, self.s_t1 = array("d"), array("d")
        self.s_kind: list = []
        self.s_param: list = []
        self.s_key: list = []
        self.s_live: dict[int, dict] = {}  # storage -> {row: None} saved and not yet released
        self.by_key: dict = {}  # storage key -> live storage id
        # graphs
        self.graphs: list[Graph] = []
        self.alive: dict[int, Graph] = {}
        self.by_step: dict[int, dict] = {}  # step -> {graph id: Graph} alive
        self.order: deque = deque()  # graph ids in creation order (dead ones dropped lazily)
        self.n_nodes = 0
        self.n_bytes = 0
        self.visits = 0  # graphs looked at by leaked(), for the scale tests: O(1) per step
        # backwards
        self.used: dict[int, array] = {}  # backward -> rows it went through
        self.bw: dict[int, dict] = {}  # backward -> figures
        self.bridge = None  # (site, old step, new step): last op joining graphs of two steps
        self.events: list[dict] = []
        self._strs: dict = {}

    def __len__(self) -> int:
        return len(self.step)

    def s(self, v):
        """One shared copy of a repeated string (module names, ops, shapes)."""
        return self._strs.setdefault(v, v)

    # --- graphs ---------------------------------------------------------------
    def new_graph(self, step, site, t) -> Graph:
        g = Graph(len(self.graphs), step, site, t)
        self.graphs.append(g)
        self.alive[g.id] = g
        self.by_step.setdefault(step, {})[g.id] = g
        self.order.append(g.id)
        return g

    def node_born(self, g: Graph) -> None:
        g.nodes += 1
        self.n_nodes += 1

    def node_died(self, g: Graph) -> None:
        g.nodes -= 1
        self.n_nodes -= 1
        self._maybe_dead(g)

    def _maybe_dead(self, g: Graph) -> None:
        if g.nodes <= 0 and g.live <= 0 and self.alive.pop(g.id, None) is not None:
            bucket = self.by_step.get(g.step)
            if bucket is not None:
                bucket.pop(g.id, None)
                if not bucket:
                    del self.by_step[g.step]

    # --- rows -----------------------------------------------------------------
    def add_storage(self, nbytes, kind, param, g: Graph, t, key) -> int:
        sid = len(self.s_nbytes)
        self.s_nbytes.append(nbytes)
        self.s_graph.append(g.id)
        self.s_first.append(len(self.step))
        self.s_t0.append(t)
        self.s_t1.append(math.inf)
        self.s_kind.append(kind)
        self.s_param.append(param)
        self.s_key.append(key)
        self.s_live[sid] = {}
        if key is not None:
            self.by_key[key] = sid
        if kind != "parameter":
            g.live_bytes += nbytes
            self.n_bytes += nbytes
        return sid

    def add_row(self, step, sid, nbytes, view, g: Graph, version, t, module, shape, dtype, device) -> int:
        i = len(self.step)
        self.step.append(step)
        self.storage.append(sid)
        self.nbytes.append(nbytes)
        self.view.append(view)
        self.graph.append(g.id)
        self.version.append(version)
        self.first_bw.append(-1)
        self.last_bw.append(-1)
        self.freed.append(ALIVE)
        self.t.append(t)
        self.t_freed.append(math.nan)
        self.free_step.append(-1)
        self.module.append(module)
        self.op.append(None)
        self.func.append(None)
        self.shape.append(shape)
        self.dtype.append(dtype)
        self.device.append(device)
        self.s_live[sid][i] = None
        g.live += 1
        if len(self.step) >= CAP:
            self.full = True
        return i

    def use(self, i: int, b: int) -> None:
        """Backward `b` went through row i."""
        if self.last_bw[i] != b:
            if self.first_bw[i] < 0:
                self.first_bw[i] = b
            self.last_bw[i] = b
            u = self.used.get(b)
            if u is None:
                u = self.used[b] = array("q")
            u.append(i)

    def release(self, i: int, how: int, t: float, step: int) -> None:
        """The graph let go of row i."""
        if self.freed[i] != ALIVE:
            return
        self.freed[i] = how
        self.t_freed[i] = t
        self.free_step[i] = step
        sid = self.storage[i]
        live = self.s_live.get(sid)
        if live is not None:
            live.pop(i, None)
            if not live:
                del self.s_live[sid]
                self.s_t1[sid] = t
                key = self.s_key[sid]
                if key is not None and self.by_key.get(key) == sid:
                    del self.by_key[key]
                if self.s_kind[sid] != "parameter":
                    g = self.graphs[self.s_graph[sid]]
                    g.live_bytes -= self.s_nbytes[sid]
                    self.n_bytes -= self.s_nbytes[sid]
        g = self.graphs[self.graph[i]]
        g.live -= 1
        self._maybe_dead(g)

    # --- leaks ----------------------------------------------------------------
    def leaked(self, step: int):
        """Graphs of earlier steps alive at the end of `step` (those of the step before only if they
        still hold saved bytes): (graphs, nodes, bytes, oldest Graph) or None. O(graphs of two steps)."""
        n, nodes, nbytes = len(self.alive), self.n_nodes, self.n_bytes
        self.visits += len(self.by_step.get(step, ())) + len(self.by_step.get(step - 1, ())) + len(
            self.by_step.get(step + 1, ()))
        for g in self.by_step.get(step, {}).values():
            n, nodes, nbytes = n - 1, nodes - g.nodes, nbytes - g.live_bytes
        for g in self.by_step.get(step + 1, {}).values():  # graphs already begun for the next step
            n, nodes, nbytes = n - 1, nodes - g.nodes, nbytes - g.live_bytes
        prev = self.by_step.get(step - 1, {})
        for g in prev.values():
            if g.live_bytes <= 0:
                n, nodes, nbytes = n - 1, nodes - g.nodes, nbytes - g.live_bytes
        if n <= 0:
            return None
        order = self.order
        while order and order[0] not in self.alive:
            order.popleft()
            self.visits += 1
        oldest = next((self.graphs[i] for i in order if self.graphs[i].step < step - 1 or (
            self.graphs[i].step == step - 1 and self.graphs[i].live_bytes > 0)), None)
        return n, nodes, nbytes, oldest

    def merge_steps(self) -> None:
        """Everything so far is step 0 (the first iteration, merged by the step clock)."""
        for i in range(len(self.step)):
            self.step[i] = 0
            if self.free_step[i] >= 0:
                self.free_step[i] = 0
        for g in self.graphs:
            g.step = 0
        self.by_step = {0: dict(self.alive)} if self.alive else {}
        for ev in self.events:
            ev["step"] = 0
        for b in self.bw.values():
            b["step"] = 0
        self.bridge = None
