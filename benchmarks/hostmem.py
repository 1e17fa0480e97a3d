"""Host memory the probe keeps per training step, under the default probe (`gp.Probe(model)`).

For each model (the benchmark MLP, and 100 x Linear(8, 8) = 200 parameters) it runs STEPS
training iterations inside one `with gp.Probe(model):`, with tracemalloc tracing from the
first iteration (8 frames, --frames). After iteration START (1,000, or STEPS // 2 when STEPS is
smaller) and after iteration STEPS it collects garbage and takes a tracemalloc snapshot
and the process RSS (psutil). Printed, as bytes per step = growth / (STEPS - START):

- probe:    growth of the Python allocations with a gradprobe frame in their traceback
            (what the probe retains: records, names, weak references ...);
- python:   growth of all traced Python allocations;
- rss:      growth of the resident set size (includes tensor memory, allocator slack).

The same loop without the probe gives the `none` row (probe column 0 by construction).
tracemalloc slows every allocation, so these runs are slow; they measure memory only.

    python benchmarks/hostmem.py --steps 20000
    python benchmarks/overhead.py --hostmem 20000      # the same
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc

import torch

import gradprobe as gp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import mlp, tiny200  # noqa: E402

MODELS = {"mlp": mlp, "tiny200": tiny200}
GP_DIR = os.path.dirname(os.path.abspath(gp.__file__))


def _rss():
    try:
        import psutil
    except ImportError:
        return float("nan")
    return psutil.Process().memory_info().rss


def _sizes(snap):
    total = sum(s.size for s in snap.statistics("filename"))
    ours = snap.filter_traces([tracemalloc.Filter(True, os.path.join(GP_DIR, "*"), all_frames=True)])
    return total, sum(s.size for s in ours.statistics("filename"))


def measure(name, steps, probed, frames=8):
    torch.manual_seed(0)
    w = MODELS[name]()
    start = min(1000, steps // 2)
    probe = gp.Probe(w.model) if probed else None
    gc.collect()
    tracemalloc.start(frames)
    t0 = time.perf_counter()
    try:
        if probe is not None:
            probe.__enter__()
        try:
            for i in range(1, steps + 1):
                w.step()
                if i == start:
                    gc.collect()
                    snap_a, rss_a = tracemalloc.take_snapshot(), _rss()
        finally:
            if probe is not None:
                gc.collect()
                snap_b, rss_b = tracemalloc.take_snapshot(), _rss()  # before exit: the probe's live state
                probe.__exit__(None, None, None)
        if probe is None:
            gc.collect()
            snap_b, rss_b = tracemalloc.take_snapshot(), _rss()
    finally:
        tracemalloc.stop()
    (tot_a, ours_a), (tot_b, ours_b) = _sizes(snap_a), _sizes(snap_b)
    n = steps - start
    return dict(model=name, probe="default" if probed else "none", start=start, steps=steps,
                ours=(ours_b - ours_a) / n, total=(tot_b - tot_a) / n, rss=(rss_b - rss_a) / n,
                ours_abs=ours_b, seconds=time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000, help="training iterations per run (default 20000)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--frames", type=int, default=8,
                    help="tracemalloc traceback depth (default 8); a probe allocation counts as the probe's "
                         "when a gradprobe frame is among these innermost frames")
    ap.add_argument("--no-baseline", action="store_true", help="skip the runs without the probe")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    print(f"torch {torch.__version__}, gradprobe {getattr(gp, '__version__', '?')}, 1 thread", flush=True)
    rows = []
    print("| model | probe | steps measured | probe bytes/step (tracemalloc) | all Python bytes/step "
          "(tracemalloc) | RSS bytes/step | probe bytes held at end | run s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in args.models.split(","):
        for probed in ((True,) if args.no_baseline else (True, False)):
            r = measure(name, args.steps, probed, frames=args.frames)
            rows.append(r)
            print(f"| {name} | {r['probe']} | {r['start']}..{r['steps']} | {r['ours']:.1f} | {r['total']:.1f} | "
                  f"{r['rss']:.1f} | {r['ours_abs']:,} | {r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
