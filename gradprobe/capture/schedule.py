"""The one schedule that decides what is recorded in which step.

Every step, cheaply: which tracked tensors received a gradient, backward rows, step
bookkeeping. Detail steps add per-op cut tracking, gradient norms and module output norms,
and saved tensors. The default (`every=None`) is the leave-on schedule: the first
`warmup` steps in full, then one step in `period`, and a step is *triggered* in full when
the previous one changed (a tensor's arrival changed, a non-finite value appeared).
"""

from __future__ import annotations

import numbers

WARMUP = 10
PERIOD = 100


class Schedule:
    def __init__(self, every=None) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1):
            raise ValueError(f"gradprobe.Probe: every must be a positive integer or None (the default schedule), "
                             f"got {every!r}")
        self.every = None if every is None else int(every)
        self.triggered: set[int] = set()

    def describe(self) -> str:
        if self.every is None:
            return f"first {WARMUP} steps, then every {PERIOD}th, and the step after a change"
        return "every step" if self.every == 1 else f"every {self.every}th step"

    def detail(self, step: int) -> bool:
        if step in self.triggered:
            return True
        if self.every is None:
            return step < WARMUP or step % PERIOD == 0
        return step % self.every == 0

    def trigger(self, step: int) -> None:
        """Capture `step` in full (the previous one changed)."""
        if self.every != 1:
            self.triggered.add(step)
            if len(self.triggered) > 64:  # only future steps matter
                self.triggered = {s for s in self.triggered if s >= step}
