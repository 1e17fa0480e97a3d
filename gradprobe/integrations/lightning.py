"""`GradProbe`: a Lightning callback that runs a gradprobe Probe over the LightningModule during `fit`.

    from gradprobe.integrations.lightning import GradProbe
    trainer = L.Trainer(callbacks=[GradProbe(report="gradprobe-report.html")])

Automatic and manual optimization (a GAN with `toggle_optimizer`), `accumulate_grad_batches`, and
`ddp`/`ddp_spawn`: each rank probes its own process and saves `NAME.rank{N}.gprobe` next to the
report; rank 0 merges them into the report. With `log_metrics`, per-step scalars go to the trainer's
loggers under `gradprobe/...` at the global step that ended each probe step (see loggers.py), and
module gradient-norm histograms to a TensorBoard logger. Imports `lightning.pytorch`, else the older
`pytorch_lightning`.
"""

from __future__ import annotations

import logging
import os

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - only the standalone package is installed
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError("gradprobe.integrations.lightning needs Lightning: pip install lightning") from None

from . import Session
from .loggers import write

log = logging.getLogger("gradprobe")


class GradProbe(Callback):
    """Probe the LightningModule from fit start to fit end (closed also when fit raises).

    `every`, `track`: as `gradprobe.Probe` (None: its defaults). `report`: an HTML report path written
    at fit end (None: none). `log_metrics`: per-step scalars through the trainer's loggers. After fit,
    `.probe` is the Probe (under `ddp_spawn` it lived in the workers: read the saved files).
    """

    def __init__(self, *, every=None, track=None, report: str | os.PathLike | None = None,
                 log_metrics: bool = True) -> None:
        super().__init__()
        self.session = Session(every, track, report)
        self.log_metrics = log_metrics

    @property
    def probe(self):
        return self.session.probe

    @property
    def saved(self) -> list[str]:
        return self.session.saved

    def on_fit_start(self, trainer, pl_module) -> None:
        self.session.start(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.session.at(trainer.global_step)
        if self.log_metrics and trainer.loggers:
            self._log(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(trainer, merge=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        try:
            self._finish(trainer, merge=False)  # other ranks may be gone: no barrier, each rank's own file
        except Exception as e:  # never hide the user's exception behind ours
            log.warning(f"gradprobe: could not finish after the exception: {e!r}")

    def teardown(self, trainer, pl_module, stage) -> None:
        self.session.close()  # fit left without on_fit_end/on_exception: remove the probe all the same

    def _finish(self, trainer, merge: bool) -> None:
        if not self.session.close():
            return
        if self.log_metrics and trainer.loggers:
            self._log(trainer, final=True)
        world = getattr(trainer, "world_size", 1) or 1
        barrier = (lambda: trainer.strategy.barrier("gradprobe_saved")) if merge and world > 1 else None
        self.session.write_report(getattr(trainer, "global_rank", 0) or 0, world, barrier)

    def _log(self, trainer, final: bool = False) -> None:
        for at, metrics, hist in self.session.metrics(trainer.global_step, final):
            for lg in trainer.loggers:
                if metrics:
                    lg.log_metrics(metrics, step=at)
                if len(hist) and type(lg).__name__ == "TensorBoardLogger":  # its experiment is a SummaryWriter
                    write(lg.experiment, at, {}, hist)
