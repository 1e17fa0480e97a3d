"""Integrations with trainers and loggers; each module imports its framework only when it is imported.

- `gradprobe.integrations.lightning.GradProbe`: a Lightning `Callback`.
- `gradprobe.integrations.hf.GradProbeCallback`: a transformers `TrainerCallback`.
- `gradprobe.integrations.loggers.log_to(probe, writer_or_run)`: TensorBoard / W&B.

`Session` is what both callbacks share: a Probe opened at the start of training and closed at its end,
per-step scalars aligned with the trainer's global step, and the report (one file per rank in a
distributed job, merged into one report on rank 0).
"""

from __future__ import annotations

import os

from .loggers import PREFIX, StepReader


class Session:
    def __init__(self, every, track, report) -> None:
        self.every, self.track = every, track
        self.report = None if report is None else os.fspath(report)
        self.probe = None
        self.reader: StepReader | None = None
        self.global_steps: dict[int, int] = {}  # probe step -> the trainer's global step after it
        self.saved: list[str] = []  # files this process wrote (report, per-rank run)

    def start(self, model) -> None:
        import gradprobe as gp
        self.close()  # a previous training left it open (HF has no exception callback)
        kw = {"every": self.every} if self.track is None else {"every": self.every, "track": self.track}
        self.probe = gp.Probe(model, **kw)
        self.reader = StepReader(self.probe)
        self.global_steps = {}
        self.probe.__enter__()

    @property
    def active(self) -> bool:
        return self.probe is not None and self.probe.depth > 0

    def close(self) -> bool:
        """Remove the probe (its records stay); False when it was not open."""
        if not self.active:
            return False
        while self.probe.depth:
            self.probe.__exit__(None, None, None)
        return True

    def at(self, global_step: int) -> None:
        """The trainer finished a batch at `global_step`: the probe's current step maps to it."""
        if self.active:
            self.global_steps[self.probe.step_idx] = global_step

    def metrics(self, global_step: int, final: bool = False) -> list[tuple[int, dict, object]]:
        """[(trainer step, {"gradprobe/...": value}, module-norm histogram)] for steps completed since."""
        if self.reader is None:
            return []
        out = []
        for step, scalars, hist in self.reader.new(final):
            out.append((self.global_steps.pop(step, global_step),
                        {f"{PREFIX}{k}": v for k, v in scalars.items() if v == v}, hist))
        return out

    def write_report(self, rank: int = 0, world: int = 1, barrier=None) -> None:
        """The report at `report`; in a distributed job each rank's run next to it (`NAME.rank{r}.gprobe`)
        and, when `barrier` is given (every rank reached the end), the merged report on rank 0."""
        if self.report is None or self.probe is None:
            return
        if world <= 1:
            self.saved.append(self.probe.report(self.report))
            return
        path = rank_path(self.report, rank)
        self.saved.append(self.probe.save(path))
        if barrier is not None:
            barrier()
            if rank == 0:
                self.saved.append(merge_ranks([rank_path(self.report, r) for r in range(world)], self.report))


def rank_path(report: str, rank: int) -> str:
    """`out/report.html` -> `out/report.rank0.gprobe`: each rank's run, next to the report."""
    return f"{os.path.splitext(report)[0]}.rank{rank}.gprobe"


def merge_ranks(paths: list[str], report: str) -> str:
    """Rank 0, after every rank saved its run: one report from all of them (a `rank` column in every
    table, findings aggregated across ranks)."""
    import gradprobe as gp
    return gp.load(paths).report(report)
