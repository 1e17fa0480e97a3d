"""torch.amp.GradScaler: the scale gradients carry, and the optimizer steps the scaler skipped.

`GradScaler.scale` and `GradScaler.step` are wrapped while the probe is installed (class
attributes, restored on exit). Norms of a backward whose loss was scaled are divided by the
scale. A step the scaler skipped (inf/NaN found, `optimizer.step()` not called) still ends
the iteration and is recorded as skipped, so its non-finite gradients are not called an error.
"""

from __future__ import annotations

import weakref

import torch

from .handles import Patch


class Amp:
    def __init__(self, probe) -> None:
        self.probe = probe
        self.scaler = lambda: None  # weakref to the scaler that scaled the latest loss
        self.scaled_step = None

    def install(self) -> list:
        cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
        if cls is None:
            return []
        orig_scale, orig_step = cls.scale, cls.step
        amp = self

        def scale(scaler, outputs):
            amp.scaler = weakref.ref(scaler)
            amp.scaled_step = amp.probe.step_idx
            return orig_scale(scaler, outputs)

        def step(scaler, optimizer, *args, **kwargs):
            out = orig_step(scaler, optimizer, *args, **kwargs)
            try:
                if scaler.is_enabled():
                    state = scaler._per_optimizer_states.get(id(optimizer), {})
                    found = state.get("found_inf_per_device") or {}
                    if found and sum(v.item() for v in found.values()) > 0:
                        amp.probe.scaler_skipped(optimizer, scaler.get_scale())
            except Exception:  # never break training because of the probe
                pass
            return out

        scale.__wrapped__, step.__wrapped__ = orig_scale, orig_step
        return [Patch(cls, "scale", scale), Patch(cls, "step", step)]

    def scale_tensor(self):
        """The scale of the loss being backwarded now (None: not scaled)."""
        scaler = self.scaler()
        if scaler is None or self.scaled_step != self.probe.step_idx:
            return None
        try:
            s = scaler._scale
            return s if scaler.is_enabled() and isinstance(s, torch.Tensor) else None
        except Exception:
            return None
