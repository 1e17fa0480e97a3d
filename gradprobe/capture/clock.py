"""The step clock: where one iteration of the user's loop ends.

The rule, strongest first:
1. `probe.step()` called explicitly: each call ends a step.
2. A function decorated with the probe: each outermost call is one step (recursion adds none).
3. Optimizers: a step ends after the optimizer that closes the cycle steps. The closer is the
   optimizer that first stepped last: with D then G (a GAN) it is G, so one step per iteration;
   with 5 critic steps per generator step it is the generator. While the first cycle is being
   learnt (the first `MERGE_WINDOW` steps, before a cycle of two or more optimizers completed),
   the arrival of a new optimizer folds the steps since the start into one (the first iteration
   may hold several backwards, split by rule 4 before any optimizer was seen, and several optimizers). A step GradScaler
   skipped counts as a step of its optimizer.
4. No `torch.optim` optimizer at all: a step ends when, after a backward, a new graph starts
   being built (the next forward), so a manual-SGD loop has one step per iteration.

A boundary found by 3 or 4 is *pending* until the next graph-building activity (a forward, an
op that builds a graph, a backward), so that what runs after the optimizer step but before the
next forward (printing `loss.item()`) stays in its own iteration.
"""

from __future__ import annotations

MERGE_WINDOW = 16


class StepClock:
    def __init__(self, on_end, on_merge, on_pending) -> None:
        self.step = 0
        self.rule = "auto"  # auto < decorator < explicit
        self.pending = False
        self.active = False  # something was recorded in the current step
        self.optimizers: list[int] = []  # ids, in order of first step
        self.closer: int | None = None
        self.confirmed = False  # a cycle of two or more optimizers completed
        self.graph_mark = None  # no optimizer: autograd sequence number at the end of the last backward
        self.calls = 0  # depth of decorated calls
        self._on_end, self._on_merge, self._on_pending = on_end, on_merge, on_pending

    def provisional(self) -> bool:
        """The steps so far may still fold into step 0 (no optimizer and no explicit or decorated step yet)."""
        return self.rule == "auto" and not self.optimizers and self.step < MERGE_WINDOW

    # --- activity ---------------------------------------------------------
    def touch(self) -> None:
        """Graph-building activity: applies a pending boundary first."""
        if self.pending:
            self.pending = False
            self.end()
        self.active = True

    def backward_begins(self, newest_root_seq) -> None:
        """A backward: in a loop without optimizers it is a new iteration only if its graph is new."""
        if self.pending and self.graph_mark is not None and not self.optimizers and newest_root_seq is not None \
                and newest_root_seq < self.graph_mark:
            self.active = True  # a second backward through the same graph: same iteration
            return
        self.touch()

    def backward_ends(self, seq_mark) -> None:
        if self.rule == "auto" and not self.optimizers:
            self.graph_mark = seq_mark
            self._set_pending()

    def optimizer_stepped(self, opt_id: int) -> None:
        if self.rule != "auto":
            return
        if opt_id not in self.optimizers:
            self.optimizers.append(opt_id)
            if not self.confirmed and 0 < self.step < MERGE_WINDOW:
                self._on_merge(0)  # the first iteration (several backwards or optimizers) is step 0
                self.step = 0
            self.closer = opt_id
            self.pending = False
            self.active = True
            self._set_pending()
            return
        if opt_id == self.closer:
            if len(self.optimizers) > 1:
                self.confirmed = True
            self.active = True
            self._set_pending()

    # --- explicit and decorated steps ----------------------------------------
    def explicit(self) -> None:
        if self.rule != "explicit":
            if self.step > 0 and self.step < MERGE_WINDOW and not self.confirmed:
                self._on_merge(0)  # steps found before probe.step() was first called were the first iteration
                self.step = 0
            self.rule = "explicit"
        self.pending = False
        self.end(force=True)

    def call_begins(self) -> None:
        self.calls += 1
        if self.calls == 1 and self.rule == "auto":
            self.rule = "decorator"
            self.pending = False

    def call_ends(self) -> None:
        self.calls -= 1
        if self.calls == 0 and self.rule == "decorator":
            self.end(force=True)

    # --- boundaries ---------------------------------------------------------
    def _set_pending(self) -> None:
        if self.active and not self.pending:
            self.pending = True
            self._on_pending(self.step + 1)

    def end(self, force: bool = False) -> None:
        if not self.active:
            if force:
                self._on_pending(self.step)  # nothing happened: the step goes on, instruments stay as they are
            return
        self._on_end(self.step)
        self.step += 1
        self.active = False
