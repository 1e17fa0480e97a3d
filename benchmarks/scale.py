"""Time and memory of building the tables (`probe.to_pandas()`, findings, summary) after long runs.

The training runs are real but tiny (so the table building, not the training, is what is
measured): chains of `Linear(4, 4)` layers (identity + 0.01 noise init, so 1,000 layers neither
vanish nor explode), batch 8, MSE loss, SGD, real backward and optimizer step each iteration.

Cases (targets from the issue):

- `a-default`  100 x Linear(4,4) (200 parameter tensors), 10,000 steps, `gp.Probe(model)`   (to_pandas < 5 s)
- `a-every1`   the same with `every=1`                                                       (to_pandas < 5 s)
- `b`          400 x Linear(4,4), 50 steps, `every=1`
- `c`          1,000 x Linear(4,4), 10,000 steps, `gp.Probe(model)`                          (to_pandas < 10 s)
- `d`          10 x Linear(4,4), 10,000 steps, `every=1`; each step also runs a validation forward
               without `torch.no_grad()` (`loss(model(xv), yv).item()`): 10,000 unused graphs  (to_pandas < 1 s)
               (the memory capture keeps at most 200,000 saved rows: about 4,800 of them are in the tables)

`--steps N` (or `--quick`) runs fewer steps than the case's own; the `to_pandas` time is then also
given extrapolated to the case's steps in proportion to the detail steps of the schedule (the
tables that cost are per detail step; the per-step ones, backward and steps, grow faster under the
default schedule but are cheap): an estimate, the full-size run is the measurement.

Measured, per case (one process, `torch.set_num_threads(1)`):

- train s:      the training loop under the probe (tracemalloc on, 1 frame: see below);
- held:         tracemalloc growth over the training run of allocations made in gradprobe files
                (what the probe keeps: records, names, weak references), and of all Python allocations;
- to_pandas s:  `probe.to_pandas()` on a cold cache (tables + diagnosis + the copies it returns),
                with tables/diagnose the split of the same work measured apart;
- findings s, summary s: `probe.findings` and `probe.summary()` right after (to_pandas cached);
- peak:         tracemalloc peak during a second cold `to_pandas()` (tracemalloc is off for the timings),
                and the RSS growth of the timed call (after - before, psutil);
- rows:         rows per table.

    python benchmarks/scale.py                      # every case at full size (2-core VM: ~40 min; ~15 with --no-trace)
    python benchmarks/scale.py --quick              # 1/10 of the steps (b unchanged)
    python benchmarks/scale.py --cases a-every1 --steps 1000
    python benchmarks/scale.py --quick --profile 15  # cProfile of to_pandas+summary: top 15 per case
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import sys
import time
import tracemalloc

import torch
import torch.nn.functional as F
from torch import nn

import gradprobe as gp

GP_DIR = os.path.dirname(os.path.abspath(gp.__file__))

# name -> (modules, steps, every, validation forward per step, target s for to_pandas)
CASES = {
    "a-default": (100, 10_000, None, False, 5.0),
    "a-every1": (100, 10_000, 1, False, 5.0),
    "b": (400, 50, 1, False, None),
    "c": (1000, 10_000, None, False, 10.0),
    "d": (10, 10_000, 1, True, 1.0),
}
QUICK_DIV = 10  # --quick: steps / 10 (at least 50)

TABLE_ORDER = ("params", "modules", "backward", "steps", "saved", "memory", "cuts", "findings")


class Chain(nn.Module):
    """n x Linear(4, 4) applied in sequence (real modules, one addmm each)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.eye(4) + 0.01 * torch.randn(4, 4))
                layer.bias.zero_()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _rss() -> float:
    try:
        import psutil
    except ImportError:
        return float("nan")
    return psutil.Process().memory_info().rss


def _traced(snap) -> tuple[int, int]:
    total = sum(s.size for s in snap.statistics("filename"))
    ours = snap.filter_traces([tracemalloc.Filter(True, os.path.join(GP_DIR, "*"), all_frames=True)])
    return total, sum(s.size for s in ours.statistics("filename"))


def train(modules: int, steps: int, every, validation: bool, seed: int = 0, trace: bool = True):
    """Run the case's training loop under a probe; return (probe, seconds, held probe bytes, held all bytes)."""
    torch.manual_seed(seed)
    model = Chain(modules)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(torch.randn(8, 4), torch.randn(8, 4)) for _ in range(8)]
    val = [(torch.randn(8, 4), torch.randn(8, 4)) for _ in range(4)]
    probe = gp.Probe(model, every=every)
    gc.collect()
    if trace:
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
    t0 = time.perf_counter()
    with probe:
        for i in range(steps):
            x, y = data[i % len(data)]
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if validation:  # missing torch.no_grad(): builds a graph nobody uses
                xv, yv = val[i % len(val)]
                F.mse_loss(model(xv), yv).item()
    seconds = time.perf_counter() - t0
    held = held_all = float("nan")
    if trace:
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        (tot_a, ours_a), (tot_b, ours_b) = _traced(before), _traced(after)
        held, held_all = ours_b - ours_a, tot_b - tot_a
        del before, after
    return probe, seconds, held, held_all


def detail_steps(every, steps: int) -> int:
    """Detail steps of the schedule in `steps` steps (without triggered ones)."""
    from gradprobe.capture.schedule import Schedule

    sched = Schedule(every)
    return sum(1 for s in range(steps) if sched.detail(s))


def _cold(probe) -> None:
    probe._cache = (None, None)  # private: forces to_pandas() to build again
    gc.collect()


def build(probe, profile: int = 0) -> dict:
    """Time to_pandas (cold), its split, findings and summary; peak memory; optionally cProfile."""
    from gradprobe.diagnose import diagnose

    out = {}
    _cold(probe)
    rss0 = _rss()
    t0 = time.perf_counter()
    tables = probe.to_pandas()
    out["to_pandas"] = time.perf_counter() - t0
    out["rss_growth"] = _rss() - rss0
    t0 = time.perf_counter()
    findings = probe.findings
    out["findings"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe.summary()
    out["summary"] = time.perf_counter() - t0
    out["rows"] = {k: len(v) for k, v in tables.items()}
    out["n_findings"] = len(findings)
    out["finding_kinds"] = sorted({f.kind for f in findings})
    saved = tables.get("saved")
    out["unused_graphs"] = (int((~saved.groupby("graph")["backward"].apply(lambda s: s.notna().any())).sum())
                            if saved is not None and len(saved) else 0)
    del tables, findings

    # the split: tables (capture/session.tables: store, cuts, memory collector) and diagnose
    gc.collect()
    t0 = time.perf_counter()
    raw = probe.tables()
    out["tables"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    diagnose(raw)
    out["diagnose"] = time.perf_counter() - t0
    del raw

    # peak Python memory of a cold to_pandas (tracemalloc slows it: not timed)
    _cold(probe)
    tracemalloc.start(1)
    probe.to_pandas()
    out["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    if profile:
        _cold(probe)
        pr = cProfile.Profile()
        pr.enable()
        probe.to_pandas()
        probe.summary()
        pr.disable()
        out["profile"] = pr
    return out


def hotspots(pr: cProfile.Profile, top: int) -> dict:
    """Top functions by cumulative time, split: the memory capture, diagnose/, the rest of gradprobe, others."""
    st = pstats.Stats(pr)
    groups = {"memory capture (capture/memory.py, memlog.py, tables/memory.py)": [], "diagnose/": [],
              "gradprobe (other)": [], "pandas/numpy/other": []}
    for (path, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        p = path.replace(os.sep, "/")
        if p.endswith(("gradprobe/capture/memory.py", "gradprobe/capture/memlog.py", "gradprobe/tables/memory.py",
                       "gradprobe/capture/savedhooks.py", "gradprobe/capture/savednodes.py")):
            g = "memory capture (capture/memory.py, memlog.py, tables/memory.py)"
        elif "/gradprobe/diagnose/" in p:
            g = "diagnose/"
        elif "/gradprobe/" in p:
            g = "gradprobe (other)"
        else:
            g = "pandas/numpy/other"
        short = p.split("/gradprobe/")[-1] if "/gradprobe/" in p else (
            p.split("site-packages/")[-1] if "site-packages/" in p else p)
        groups[g].append((ct, tt, nc, f"{short}:{line}({fn})"))
    total = sum(tt for (_, _, tt, _, _) in st.stats.values())
    return {"total": total, **{g: sorted(v, reverse=True)[:top] for g, v in groups.items()}}


def env_line() -> str:
    return (f"torch {torch.__version__}, pandas {_version('pandas')}, numpy {_version('numpy')}, gradprobe "
            f"{getattr(gp, '__version__', '?')}, Python {platform.python_version()}, "
            f"{torch.get_num_threads()} thread(s), {platform.machine()}, {os.cpu_count()} CPUs")


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "?"


def _mb(n) -> str:
    return "n/a" if n != n else f"{n / 2**20:,.1f}"


def markdown(results, command, traced=True) -> str:
    out = ["| case | steps | train s | held MiB (gradprobe / all) | to_pandas s | (tables + diagnose) | "
           "to_pandas s at case steps | target | findings s | summary s | peak MiB (tracemalloc) | "
           "RSS growth MiB | rows |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            out.append(f"| {r['case']} | {r['steps']} | error: {r['error']} | | | | | | | | | | |")
            continue
        b = r["build"]
        scale = detail_steps(r["every"], r["case_steps"]) / detail_steps(r["every"], r["steps"])
        extra = f"~{b['to_pandas'] * scale:.2f}" if scale != 1 else f"{b['to_pandas']:.2f}"
        target = "-" if r["target"] is None else (
            f"< {r['target']:g} s: " + ("met" if b["to_pandas"] * scale < r["target"] else "**missed**"))
        rows = ", ".join(f"{k} {b['rows'][k]:,}" for k in TABLE_ORDER if k in b["rows"])
        out.append(f"| {r['case']} | {r['steps']:,} | {r['train']:.1f} | {_mb(r['held'])} / {_mb(r['held_all'])} | "
                   f"**{b['to_pandas']:.3f}** | {b['tables']:.3f} + {b['diagnose']:.3f} | {extra} | {target} | "
                   f"{b['findings']:.3f} | {b['summary']:.3f} | {_mb(b['peak'])} | {_mb(b['rss_growth'])} | "
                   f"{rows}; unused graphs {b['unused_graphs']:,} |")
    out.append("")
    out.append(f"{env_line()}. Command: `{command}`. "
               + ("train s is under tracemalloc (1 frame). " if traced else "")
               + "Extrapolation to the case's steps: in proportion to detail steps.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    ap.add_argument("--steps", type=int, help="steps of every case (default: the case's own)")
    ap.add_argument("--quick", action="store_true", help=f"steps / {QUICK_DIV} (at least 50)")
    ap.add_argument("--no-trace", action="store_true", help="train without tracemalloc (no held column)")
    ap.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="cProfile to_pandas()+summary() and print the TOP functions by cumulative time per group")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; cases: {list(CASES)}")
    torch.set_num_threads(1)
    command = "python benchmarks/scale.py" + ("" if not sys.argv[1:] else " " + " ".join(sys.argv[1:]))
    print(env_line(), flush=True)
    warm, *_ = train(3, 3, 1, True, trace=False)  # imports and first-call costs, out of the first case's times
    warm.to_pandas(), warm.summary()
    del warm
    results = []
    for name in names:
        modules, case_steps, every, validation, target = CASES[name]
        steps = args.steps or (max(50, case_steps // QUICK_DIV) if args.quick else case_steps)
        steps = min(steps, case_steps) if args.quick else steps
        r = dict(case=name, steps=steps, case_steps=case_steps, target=target, every=every)
        try:
            probe, r["train"], r["held"], r["held_all"] = train(modules, steps, every, validation,
                                                                trace=not args.no_trace)
            r["build"] = build(probe, args.profile)
        except Exception as e:  # one failing case must not hide the others
            r["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"{name}: ERROR {r['error']}", flush=True)
            results.append(r)
            continue
        b = r["build"]
        print(f"{name:<10} {modules} modules, {steps} steps, every={every}: train {r['train']:.1f} s, "
              f"to_pandas {b['to_pandas']:.3f} s (tables {b['tables']:.3f} + diagnose {b['diagnose']:.3f}), "
              f"findings {b['findings']:.3f} s, summary {b['summary']:.3f} s, findings: {b['finding_kinds']}; "
              f"rows {b['rows']}", flush=True)
        if args.profile:
            h = hotspots(b.pop("profile"), args.profile)
            print(f"  cProfile of to_pandas()+summary() (profiled total {h['total']:.2f} s), by cumulative s:")
            for group in list(h)[1:]:
                print(f"   [{group}]")
                for ct, tt, nc, fn in h[group]:
                    print(f"     {ct:8.3f} cum {tt:8.3f} own {nc:>9} calls  {fn}")
            sys.stdout.flush()
        del probe
        gc.collect()
        results.append(r)
    print()
    print(markdown(results, command, traced=not args.no_trace))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
