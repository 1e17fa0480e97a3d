"""Step-time overhead of the probe: median step time with the probe / without, in one process.

Baseline and probed blocks alternate (so drift hits both alike); each figure is
the median over at least 100 measured steps after warm-up.

    python benchmarks/overhead.py            # prints a markdown table
    python benchmarks/overhead.py --write    # also rewrites benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from torch import nn

import gradprobe as gp


def mlp():
    layers = []
    for _ in range(5):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers), (lambda: torch.randn(64, 512)), "MLP 5 x Linear(512), batch 64"


def cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    return model, (lambda: torch.randn(32, 3, 32, 32)), "CNN 2 x Conv + Linear, batch 32 of 3x32x32"


CONFIGS = {  # name -> (track, every)
    "grads": (("grads",), 1),
    "grads+cuts": (("grads", "cuts"), 1),
    "all": (("grads", "cuts", "memory"), 1),
    "grads every=10": (("grads",), 10),
    "all every=10": (("grads", "cuts", "memory"), 10),
}


def measure(make, track, every=1, blocks=30, block=10, warmup=20):
    torch.manual_seed(0)
    model, batch, label = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [batch() for _ in range(8)]

    def step(i):
        t0 = time.perf_counter()
        loss = model(data[i % len(data)]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    probe = gp.Probe(model, track=track, every=every)
    for i in range(warmup):
        step(i)
    with probe:
        for i in range(warmup):
            step(i)
    base, probed, ratios = [], [], []
    for b in range(blocks):
        bb = [step(i) for i in range(block)]
        with probe:
            pp = [step(i) for i in range(block)]
        base += bb
        probed += pp
        ratios.append(statistics.median(pp) / statistics.median(bb))
    # the ratio of neighbouring blocks is robust to slow drift of the machine's speed
    return label, statistics.median(base), statistics.median(probed), statistics.median(ratios), len(probed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS.md")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/RESULTS.md", help="file that --write rewrites")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for make in (mlp, cnn):
        for name in args.configs.split(","):
            label, mb, mp, ratio, n = measure(make, *CONFIGS[name])
            rows.append(f"| {label} | {name} | {mb * 1e3:.3f} | {mp * 1e3:.3f} | **{ratio:.3f}x** | {n} |")
            print(rows[-1], flush=True)
    head = ["| model | track | median step without (ms) | with probe (ms) | ratio | steps |",
            "| --- | --- | --- | --- | --- | --- |"]
    env = (f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
           f"{platform.machine()}")
    table = "\n".join(head + rows)
    if args.write:
        cmd = "python benchmarks/overhead.py --write" + (f" --threads {args.threads}" if args.threads else "")
        with open(args.out, "w") as f:
            f.write(RESULTS_HEAD.format(env=env, cmd=cmd, table=table))
    print(env)
    return 0


RESULTS_HEAD = """# Overhead benchmarks

Command: `{cmd}` (from the repository root, in the project venv).
Environment: {env}.

Ratio = median over 30 pairs of neighbouring blocks (10 steps without the probe, then 10
with it, same process, after 20 warm-up steps) of median step time with / without; 300
measured steps each. The step-time columns are medians over all 300 steps. Targets:
`grads` <= 1.05x, everything <= 1.25x on the MLP.

{table}
"""

if __name__ == "__main__":
    sys.exit(main())
