"""Training-time overhead of the probe on the workloads of COMPAT.md section D.

Method (one process, `torch.set_num_threads(1)`): for each workload and configuration,
the workload is built from seed 0 and the probe object is created once. Warm-up runs
W iterations without and W with the probe; then each repetition runs B pairs of
blocks, a baseline block of K iterations followed by a probed block of K iterations
(`with probe:` re-entered for each probed block, so the probe's schedule runs over the
whole run: warm-up and all repetitions). A block's time covers its K iterations only;
entering and leaving `with probe:` is timed apart (column "enter+exit" of the plain
output). ratio = sum of probed block times / sum of baseline block times over one
repetition; the table gives the median over R repetitions and their min-max spread.

Configurations: `default` = gp.Probe(model), `every=1` = gp.Probe(model, every=1),
`grads` = gp.Probe(model, track="grads", every=1), `memory` = gp.Probe(model, track="memory"),
`memory every=1` = gp.Probe(model, track="memory", every=1).

    python benchmarks/overhead.py                         # every workload and configuration
    python benchmarks/overhead.py --markdown              # markdown table at the end
    python benchmarks/overhead.py --quick                 # smoke run with small numbers
    python benchmarks/overhead.py --workloads mlp,cnn --configs default --repeats 9
    python benchmarks/overhead.py --hostmem 20000         # host memory per step (see hostmem.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import gradprobe as gp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS, Skip, ddp_mlp  # noqa: E402

EXTRA = {"ddp_mlp": ddp_mlp}  # run only when named: it initialises a process group

CONFIGS = {  # name -> keyword arguments of gp.Probe besides the model
    "default": {},
    "every=1": {"every": 1},
    "grads": {"track": "grads", "every": 1},
    "memory": {"track": "memory"},
    "memory every=1": {"track": "memory", "every": 1},
}

DEFAULTS = dict(warmup=10, blocks=10, block=None, repeats=5)  # block None: the workload's own size
QUICK = dict(warmup=2, blocks=2, block=2, repeats=2)


def make_probe(model, config):
    # `every` is passed only when it is not the default, so this works with today's Probe
    # (every: int = 1) and with the rewritten one (every=None by default).
    return gp.Probe(model, **CONFIGS[config])


def _probe_steps(probe):
    """(steps, backward calls) the probe recorded, read back after the timing; None if unreadable."""
    try:
        bw = probe.to_pandas()["backward"]
        if len(bw) == 0:
            return 0, 0
        return int(bw["step"].max()) + 1, len(bw)
    except Exception:
        return None


def measure(name, config, *, warmup, blocks, block, repeats, seed=0):
    torch.manual_seed(seed)
    w = {**WORKLOADS, **EXTRA}[name]()
    k = block or w.block
    step = w.step
    probe = make_probe(w.model, config)

    def run_block(n):
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        return time.perf_counter() - t0, loss

    run_block(warmup)
    with probe:
        run_block(warmup)
    ratios, base_ms, probe_ms, enter_exit = [], [], [], []
    last = None
    for _ in range(repeats):
        tb = tp = 0.0
        for _ in range(blocks):
            t, last = run_block(k)
            tb += t
            t0 = time.perf_counter()
            with probe:
                t1 = time.perf_counter()
                t, last = run_block(k)
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            tp += t
            enter_exit.append((t1 - t0) + (t3 - t2))
        ratios.append(tp / tb)
        base_ms.append(tb / (blocks * k) * 1e3)
        probe_ms.append(tp / (blocks * k) * 1e3)
    finite = bool(torch.isfinite(last.detach()).all())
    return dict(
        workload=name, label=w.label, config=config, block=k,
        base_ms=statistics.median(base_ms), probe_ms=statistics.median(probe_ms),
        ratio=statistics.median(ratios), lo=min(ratios), hi=max(ratios),
        iters=repeats * blocks * k, enter_exit_ms=statistics.median(enter_exit) * 1e3,
        expected_steps=warmup + repeats * blocks * k, recorded=_probe_steps(probe),
        finite=finite,
    )


def _fmt_plain(r):
    rec = r["recorded"]
    rec = "?" if rec is None else f"{rec[0]} steps/{rec[1]} backward"
    note = "" if r["finite"] else "  LOSS NOT FINITE"
    return (f"{r['workload']:<13} {r['config']:<8} base {r['base_ms']:8.3f} ms  probed {r['probe_ms']:8.3f} ms  "
            f"ratio {r['ratio']:.3f} [{r['lo']:.3f}-{r['hi']:.3f}]  n={r['iters']} (K={r['block']})  "
            f"enter+exit {r['enter_exit_ms']:.2f} ms  probe saw {rec} (expected {r['expected_steps']} steps){note}")


def markdown(rows, skipped, args):
    out = ["| workload | config | baseline ms/iter | probed ms/iter | ratio (median) | spread (min-max) | iterations |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} | {r['config']} | error: {r['error']} | | | | |")
            continue
        out.append(f"| {r['workload']} | {r['config']} | {r['base_ms']:.3f} | {r['probe_ms']:.3f} | "
                   f"**{r['ratio']:.3f}x** | {r['lo']:.3f}-{r['hi']:.3f} | {r['iters']} |")
    for name, why in skipped:
        out.append(f"| {name} | - | skipped: {why} | | | | |")
    out.append("")
    labels = {r["workload"]: r["label"] for r in rows if "label" in r}
    out += [f"- `{k}`: {v}" for k, v in labels.items()]
    out.append("")
    out.append(f"{env_line()}. Command: `{command_line(args)}`. Iterations = probed iterations measured "
               f"(the same number without the probe), {args.repeats} repetitions of {args.blocks} block pairs.")
    return "\n".join(out)


def env_line():
    return (f"torch {torch.__version__}, gradprobe {getattr(gp, '__version__', '?')}, Python "
            f"{platform.python_version()}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
            f"{os.cpu_count()} CPUs")


def command_line(args):
    return "python benchmarks/overhead.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python benchmarks/overhead.py"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join([*WORKLOADS, *EXTRA]))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--blocks", type=int, help=f"block pairs per repetition (default {DEFAULTS['blocks']})")
    ap.add_argument("--block", type=int, help="iterations per block (default: the workload's own, 4-10)")
    ap.add_argument("--repeats", type=int, help=f"repetitions (default {DEFAULTS['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"warm-up iterations, without and with the probe "
                                               f"(default {DEFAULTS['warmup']})")
    ap.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    ap.add_argument("--hostmem", type=int, metavar="STEPS",
                    help="instead: host memory growth per step under the default probe (hostmem.py)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    if args.hostmem is not None:
        import hostmem
        return hostmem.main(["--steps", str(args.hostmem)])

    base = QUICK if args.quick else DEFAULTS
    for key in ("warmup", "blocks", "block", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    names = [n for n in args.workloads.split(",") if n]
    configs = [c for c in args.configs.split(",") if c]
    bad = [n for n in names if n not in WORKLOADS and n not in EXTRA] + [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown workload/config {bad}; workloads: {list(WORKLOADS)}, configs: {list(CONFIGS)}")

    print(env_line(), flush=True)
    rows, skipped = [], []
    t_start = time.perf_counter()
    for name in names:
        for config in configs:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = measure(name, config, warmup=args.warmup, blocks=args.blocks, block=args.block,
                                repeats=args.repeats)
            except Skip as e:
                print(f"{name:<13} skipped: {e}", flush=True)
                skipped.append((name, str(e)))
                break
            except Exception as e:  # keep going: one failing workload must not hide the others
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                print(f"{name:<13} {config:<8} ERROR {msg}", flush=True)
                rows.append(dict(workload=name, config=config, error=msg))
                continue
            rows.append(r)
            print(_fmt_plain(r), flush=True)
    print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)
    if args.markdown:
        print()
        print(markdown(rows, skipped, args))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
