"""Where the probe steps aside: torch.compile'd code and torch.func transforms.

Compiled code is traced once and guards on hooks and torch-function modes: hooks or a mode that
come and go with the schedule would add graph breaks and recompilations (and OptimizedModule warns
about global hooks). So once compiled code is in play (a compiled model given to the probe, code
compiled before, or a compilation starting while the probe is on) the probe keeps only what needs
no per-op hook: backwards, arrival and norms of gradients, steps. Dynamo runs the probe's hooks as
they are. torch.func transforms refuse saved-tensor hooks: the probe pauses inside them.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .handles import Patch


def watch_compile(capture, stack) -> None:
    """Switch `capture` to compiled mode when compiled code is in play (see above); handles go on `stack`."""
    if capture.compiled or capture.compiled_model or compiled_before():
        capture._compiled()
        return
    registered = []

    def on_start(*args):
        capture._compiled()

    def register():
        from torch._dynamo import callback_handler
        _not_for_dynamo(capture)
        callback_handler.register_start_callback(on_start)
        registered.append(stack.add(_Callback(callback_handler, on_start)))

    if "torch._dynamo" in sys.modules:
        register()
    else:  # torch.compile imports dynamo: register then
        orig = torch.compile

        def compile(*args, **kwargs):
            if not registered:
                register()
            return orig(*args, **kwargs)

        compile.__wrapped__ = orig
        stack.add(Patch(torch, "compile", compile))


def functorch_region(capture):
    """torch.func transforms refuse saved-tensor hooks: the probe steps aside inside them and says so."""
    orig = torch.autograd.graph.disable_saved_tensors_hooks
    
    @contextlib.contextmanager
    def disable_saved_tensors_hooks(error_message):
        if "torch.func" in error_message:
            capture.note("torch.func")
        capture.busy += 1
        paused = capture.memory is not None and capture.memory.pause()
        try:
            with orig(error_message):
                yield
        finally:
            capture.busy -= 1
            if paused:
                capture.memory.resume()

    disable_saved_tensors_hooks.__wrapped__ = orig
    return disable_saved_tensors_hooks


def _not_for_dynamo(capture) -> None:
    """Dynamo runs our hooks, and all they call, as they are instead of compiling them as frames.

    (A compiled module's own hooks run eagerly inside dynamo's context: without this, each Python
    function they call would be a frame to compile.)
    """
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return
    from .backward import Backwards
    from .flow import Flow, _Arrival
    from .mode import ProbeMode
    from .modules import ModuleStack
    skip = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)
    fns = [ModuleStack._pre, ModuleStack._post, Flow.hook_output, _Arrival.__call__,
           ProbeMode.__torch_function__, type(capture)._compiled, Backwards._engine]
    for fn in fns:
        set_code_exec_strategy(fn.__code__, skip)
        for const in fn.__code__.co_consts:
            if hasattr(const, "co_code"):
                set_code_exec_strategy(const, skip)


def is_compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def uncompiled(module):
    """The module a torch.compile wrapper runs (names without `_orig_mod.`)."""
    return module._orig_mod if is_compiled(module) else module


def compiled_before() -> bool:
    """Compiled code from before the probe is cached in this process (torch._dynamo.reset() clears it)."""
    convert = sys.modules.get("torch._dynamo.convert_frame")
    try:
        return convert is not None and any(r() is not None for r in convert.output_codes.seen)
    except Exception:
        return False


class _Callback:
    def __init__(self, handler, fn) -> None:
        self.handler, self.fn = handler, fn

    def remove(self) -> None:
        if self.fn in self.handler.start_callbacks:
            self.handler.remove_start_callback(self.fn)
