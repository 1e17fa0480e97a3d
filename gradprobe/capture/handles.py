"""Installing and removing: handle-like objects on one ExitStack, removed last-in first-out.

Every handle's `remove()` is idempotent (like `torch.utils.hooks.RemovableHandle`) and never
removes anything that is not the probe's own: a patched attribute is restored only while it
still holds our replacement, a mode is popped only while it is on top of the stack.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("gradprobe")


class Patch:
    """`setattr(owner, name, new)` until removed; restores the original only if `new` is still there."""

    def __init__(self, owner, name: str, new) -> None:
        self.owner, self.name, self.new = owner, name, new
        self.old = getattr(owner, name)
        setattr(owner, name, new)
        self.done = False

    def remove(self) -> None:
        if self.done:
            return
        self.done = True
        if getattr(self.owner, self.name, None) is self.new:
            setattr(self.owner, self.name, self.old)
        else:  # someone patched over us: leave theirs, and the chain still calls ours, which passes through
            log.info("gradprobe: %s.%s was replaced after the probe patched it; left as it is", self.owner, self.name)


class ModeOnStack:
    """A TorchFunctionMode pushed on the calling thread's stack; `pop_if_top` steps it aside."""

    def __init__(self, mode) -> None:
        self.mode = mode
        self.on = False

    def push(self) -> None:
        if not self.on:
            torch._C._push_on_torch_function_stack(self.mode)
            self.on = True

    def on_top(self) -> bool:
        n = torch._C._len_torch_function_stack()
        return bool(n) and torch._C._get_function_stack_at(n - 1) is self.mode

    def pop_if_top(self) -> bool:
        """Take our mode off if it is on top (never pop anyone else's); True if it was taken off."""
        if not self.on:
            return False
        n = torch._C._len_torch_function_stack()
        if n and torch._C._get_function_stack_at(n - 1) is self.mode:
            torch._C._pop_torch_function_stack()
            self.on = False
            return True
        return False

    def remove(self) -> None:
        if self.on and not self.pop_if_top():
            log.info("gradprobe: another torch-function mode is above the probe's at exit; left the stack as it is")
            self.on = False


class Group:
    """Handles that come and go together (the detail instruments of a step): removable and re-addable."""

    def __init__(self) -> None:
        self.handles: list = []

    def add(self, handle):
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        while self.handles:
            h = self.handles.pop()
            try:
                h.remove()
            except Exception as e:  # one failing removal must not keep the others installed
                log.warning("gradprobe: could not remove %r: %r", h, e)


class Installed(contextlib.ExitStack):
    """The probe's installation: `add(handle)` pushes `handle.remove` to run on close, LIFO."""

    def add(self, handle):
        self.callback(_safe_remove, handle)
        return handle


def _safe_remove(handle) -> None:
    try:
        handle.remove()
    except Exception as e:
        log.warning("gradprobe: could not remove %r: %r", handle, e)


class Hooks:
    """Handles of torch hooks as one handle."""

    def __init__(self, handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class MemoryHandle:
    def __init__(self, memory) -> None:
        self.memory = memory
        memory.install()

    def remove(self) -> None:
        self.memory.remove()
