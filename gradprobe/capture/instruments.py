"""The detail instruments: module hooks, the cuts mode and saved-tensor hooks, on or off with the schedule.

They change only on the thread that entered the probe and never while a backward runs (an optimizer
stepped in a post-accumulate-grad hook: the engine restores the thread's saved-tensor hooks when it
returns). The mode can only leave the torch-function stack from outside its own handler: inside
`__torch_function__` (a `loss.backward()` runs there) PyTorch has popped it and pushes it back
afterwards. Until then it is inert, and the next module call, optimizer step or backward retries.
"""

from __future__ import annotations

import threading

from .handles import Group, Hooks, ModeOnStack


class Instruments(Group):
    def __init__(self, capture) -> None:
        super().__init__()
        self.c = capture
        self.mode_handle: ModeOnStack | None = None
        self.want_off = False  # to come off at the next chance (see try_off)
        self.arm_later = None  # a step whose instruments were set during a backward: applied at its end

    def _here(self) -> bool:
        """On the probe's thread and outside a backward."""
        c = self.c
        tid = threading.get_ident()
        return (c.thread is None or tid == c.thread) and tid not in c.backwards.by_thread

    def arm(self, step: int) -> None:
        """Set the instruments for `step` (the one under way or the one about to begin)."""
        c = self.c
        if c.thread is not None and threading.get_ident() != c.thread:
            return
        if threading.get_ident() in c.backwards.by_thread:
            self.arm_later = step
            return
        if c.detail_of(step) and not c.compiled:
            self.want_off = False
            if c.mode is not None:
                c.mode.enabled = True
            if not self.handles:
                self.add(Hooks(c.modules.install()))
                if c.memory is not None:
                    c.memory.resume()
            if c.mode is not None and self.mode_handle is None:
                self.mode_handle = ModeOnStack(c.mode)
                self.mode_handle.push()
            return
        if c.memory is not None:
            c.memory.pause()  # installed on entering the probe: off until a detail step
        if self.handles or self.mode_handle is not None:
            self.off_soon()

    def off_soon(self) -> None:
        if self.c.mode is not None:
            self.c.mode.enabled = False  # inert at once; off the stack as soon as we are outside its handler
        self.want_off = True
        self.try_off()

    def try_off(self) -> None:
        if not self.want_off or not self._here():
            return
        c = self.c
        if self.handles:
            super().remove()
            c.modules.clear()
            if c.memory is not None:
                c.memory.pause()
        h = self.mode_handle
        if h is not None:
            if h.on and not h.on_top():
                return
            h.remove()
            self.mode_handle = None
        self.want_off = False

    def backward_ended(self) -> None:
        if self.arm_later is not None:
            step, self.arm_later = self.arm_later, None
            self.arm(step)
        self.try_off()

    def mode_aside(self) -> bool:
        h = self.mode_handle
        return h is not None and threading.get_ident() == self.c.thread and h.pop_if_top()

    def resume_mode(self) -> None:
        h = self.mode_handle
        if h is not None and not h.on and not self.want_off and threading.get_ident() == self.c.thread:
            h.push()

    def remove(self) -> None:
        """On leaving the probe: everything off now."""
        if self.mode_handle is not None:
            self.mode_handle.remove()
            self.mode_handle = None
        super().remove()

    def closed(self) -> None:
        self.want_off = False
        self.mode_handle = None
        self.arm_later = None
