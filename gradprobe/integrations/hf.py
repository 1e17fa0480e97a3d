"""`GradProbeCallback`: a transformers `TrainerCallback` that runs a gradprobe Probe during `Trainer.train`.

    from gradprobe.integrations.hf import GradProbeCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradProbeCallback(report="report.html")])

The probe observes the trainer's model from `on_train_begin` to `on_train_end`: one probe step per
optimizer step (so `gradient_accumulation_steps` backwards make one step), evaluations included (run
under no_grad, they build no graph). With `log_metrics`, per-step scalars (`gradprobe/...`, see
loggers.py) go into `trainer.state.log_history` at the global step that ended each probe step, to
TensorBoard (a SummaryWriter where HF's writes) when "tensorboard" is in `report_to`, and to the active
W&B run when "wandb" is. HF has no exception callback: when `train()` raises, `callback.close()`
removes the probe (the next `train()` also does).
"""

from __future__ import annotations

import logging
import os

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("gradprobe.integrations.hf needs transformers: pip install transformers accelerate") from None

from . import Session
from .loggers import PREFIX, write

log = logging.getLogger("gradprobe")


class GradProbeCallback(TrainerCallback):
    """Probe the trainer's model during `train()`.

    `every`, `track`: as `gradprobe.Probe` (None: its defaults). `report`: an HTML report path written
    when training ends (None: none). `log_metrics`: per-step scalars to the trainer's log history and
    reporters. After training, `.probe` is the Probe and `.metrics` the logged [(step, {name: value})].
    """

    def __init__(self, *, every=None, track=None, report: str | os.PathLike | None = None,
                 log_metrics: bool = True) -> None:
        self.session = Session(every, track, report)
        self.log_metrics = log_metrics
        self.metrics: list[tuple[int, dict]] = []
        self._sinks: list | None = None

    @property
    def probe(self):
        return self.session.probe

    @property
    def saved(self) -> list[str]:
        return self.session.saved

    def close(self) -> None:
        """Remove the probe now (after `train()` raised); its records stay readable."""
        self.session.close()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("gradprobe: GradProbeCallback got no model from the Trainer; "
                             "pass it to Trainer(model=...)")
        self._sinks = None  # this run's reporters
        self.session.start(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.session.at(state.global_step)
        if self.log_metrics:
            self._log(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.session.close():
            return
        if self.log_metrics:
            self._log(args, state, final=True)
            for sink in self._sinks or ():
                if hasattr(sink, "close") and hasattr(sink, "add_scalar"):
                    sink.close()  # our own SummaryWriter
        world = getattr(args, "world_size", 1) or 1
        self.session.write_report(getattr(args, "process_index", 0) or 0, world, _barrier() if world > 1 else None)

    def _log(self, args, state, final: bool = False) -> None:
        for at, metrics, hist in self.session.metrics(state.global_step, final):
            if not metrics:
                continue
            self.metrics.append((at, metrics))
            state.log_history.append({**metrics, "step": at})
            for sink in self._reporters(args):
                write(sink, at, {k[len(PREFIX):]: v for k, v in metrics.items()}, hist)

    def _reporters(self, args) -> list:
        """TensorBoard and W&B when the trainer reports to them (made once, on first use)."""
        if self._sinks is None:
            self._sinks = []
            report_to = args.report_to or []
            report_to = [report_to] if isinstance(report_to, str) else list(report_to)
            if "tensorboard" in report_to or "all" in report_to:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._sinks.append(SummaryWriter(log_dir=_tensorboard_dir(args)))
                except ImportError:
                    pass
            if "wandb" in report_to or "all" in report_to:
                try:
                    import wandb
                    if wandb.run is not None:
                        self._sinks.append(wandb.run)
                except ImportError:
                    pass
        return self._sinks


def _tensorboard_dir(args) -> str:
    """Where HF's TensorBoardCallback writes (logging_dir before transformers 5; then the environment
    variable or `output_dir/runs`), with our own event file beside its."""
    where = getattr(args, "logging_dir", None) or os.getenv("TENSORBOARD_LOGGING_DIR")
    return os.path.expanduser(where) if where else os.path.join(args.output_dir, "runs", "gradprobe")


def _barrier():
    """Every rank of an HF distributed run reached the end (torch.distributed is initialized there)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.barrier
    return None
