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


def measure(make, track, every=1, blocks=20, block=10, warmup=20):
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
    base, probed = [], []
    for b in range(blocks):
        base += [step(i) for i in range(block)]
        with probe:
            probed += [step(i) for i in range(block)]
    mb, mp = statistics.median(base), statistics.median(probed)
    return label, mb, mp, len(probed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS.md")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    args = ap.parse_args(argv)
    rows = []
    for make in (mlp, cnn):
        for name in args.configs.split(","):
            label, mb, mp, n = measure(make, *CONFIGS[name])
            rows.append(f"| {label} | {name} | {mb * 1e3:.3f} | {mp * 1e3:.3f} | **{mp / mb:.3f}x** | {n} |")
            print(rows[-1], flush=True)
    head = ["| model | track | median step without (ms) | with probe (ms) | ratio | steps |",
            "| --- | --- | --- | --- | --- | --- |"]
    env = (f"torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
           f"{platform.machine()}")
    table = "\n".join(head + rows)
    if args.write:
        with open("benchmarks/RESULTS.md", "w") as f:
            f.write(RESULTS_HEAD.format(env=env, cmd="python benchmarks/overhead.py --write", table=table))
    print(env)
    return 0


RESULTS_HEAD = """# Overhead benchmarks

Command: `{cmd}` (from the repository root, in the project venv).
Environment: {env}.

Ratio = median step time with the probe / without, same process, alternating blocks of
10 steps, 200 measured steps each after 20 warm-up steps. Targets: `grads` <= 1.05x,
everything <= 1.25x on the MLP.

{table}
"""

if __name__ == "__main__":
    sys.exit(main())
