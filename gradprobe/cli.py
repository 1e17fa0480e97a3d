"""Command line: `gradprobe demo`, `gradprobe report RUN...`, `gradprobe summary RUN...`,
`gradprobe run SCRIPT [ARGS...]`. Several run files (the ranks of one distributed job) are merged into one.

Expected failures (a missing or foreign run file, an unwritable path, an unknown demo) print
one line to stderr and exit with status 2; progress goes to stderr so stdout stays clean.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path


def _demos() -> tuple[dict[str, str], str | None]:
    """(name -> description, default name) from the gradprobe_demos package, or ({}, None)."""
    try:
        demos = importlib.import_module("gradprobe_demos")
    except ImportError:
        return {}, None
    return dict(getattr(demos, "DEMOS", {})), getattr(demos, "DEFAULT", None)


def _demo_list(demos: dict[str, str], default: str | None) -> str:
    if not demos:
        return "no demos installed (the gradprobe_demos package is missing)"
    width = max(map(len, demos))
    return "demos:\n" + "\n".join(
        f"  {n:<{width}}  {d}{'  (default)' if n == default else ''}" for n, d in demos.items())


def _progress(msg: str) -> None:
    print(f"gradprobe: {msg}", file=sys.stderr, flush=True)


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


class DemoFailed(RuntimeError):
    """A demo raised: a bug, shown with its traceback."""


def _parser() -> argparse.ArgumentParser:
    demos, default = _demos()
    p = argparse.ArgumentParser(
        prog="gradprobe",
        description="Where did my gradients go, and what is my autograd graph holding in memory?",
        epilog="Run 'gradprobe COMMAND --help' for a command's options.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"gradprobe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="run a demo training loop and write its HTML report",
                       description="Run one of the bundled demos under a gradprobe.Probe and write its report.",
                       epilog=_demo_list(demos, default), formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("name", nargs="?", default=default, metavar="NAME",
                   help=f"which demo (default: {default or 'none installed'}); see the list below")
    d.add_argument("-o", "--output", default="report.html", metavar="HTML",
                   help="where to write the report (default: report.html)")
    d.add_argument("--save", metavar="RUN", help="also save the recorded run to this file (e.g. demo.gprobe)")
    d.add_argument("--list", action="store_true", help="list the demos and exit")
    r = sub.add_parser("report", help="write the HTML report of a saved run",
                       description="Write the self-contained HTML report of a run saved with probe.save(). "
                                   "Several files (the ranks of one job: run.rank*.gprobe) make one report.")
    r.add_argument("run", nargs="+", metavar="RUN", help="run file(s) written by probe.save()")
    r.add_argument("-o", "--output", metavar="HTML", help="where to write the report (default: RUN with .html)")
    s = sub.add_parser("summary", help="print the plain-text summary of a saved run",
                       description="Print the summary and findings of a run saved with probe.save(). "
                                   "Several files (the ranks of one job: run.rank*.gprobe) are merged.")
    s.add_argument("run", nargs="+", metavar="RUN", help="run file(s) written by probe.save()")
    from .runscript import DEFAULT_REPORT, DEFAULT_RUN
    x = sub.add_parser("run", help="run a training script under a probe and write its run and report",
                       description="Run SCRIPT as __main__ with ARGS (like python -m cProfile) under "
                                   "gradprobe.Probe(None), which observes every module and leaf tensor a "
                                   "backward reaches; write the run file and the HTML report when it ends "
                                   "(also when it fails). The exit status is the script's.")
    x.add_argument("-o", "--output", default=DEFAULT_RUN, metavar="RUN",
                   help=f"where to save the run (default: {DEFAULT_RUN}; rank r of a distributed job "
                        "writes RUN with .rank{r} before the suffix)")
    x.add_argument("--report", default=DEFAULT_REPORT, metavar="HTML",
                   help=f"where to write the report (default: {DEFAULT_REPORT})")
    x.add_argument("--every", type=_every, metavar="N",
                   help="full detail every N steps (default: the first 10 steps, then 1 in 100)")
    x.add_argument("--track", action="append", metavar="WHAT",
                   help="what to track: grads, cuts, memory (comma-separated or repeated; default: all)")
    x.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    x.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")
    return p


def _every(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--every takes a whole number of steps >= 1, got {text!r}")
    return n


def _cmd_demo(args) -> int:
    demos, default = _demos()
    if args.list:
        print(_demo_list(demos, default))
        return 0
    if not demos:
        raise UsageError("no demos installed: the gradprobe_demos package cannot be imported "
                         "(install gradprobe from its source tree with 'pip install -e .')")
    if args.name not in demos:
        raise UsageError(f"unknown demo {args.name!r}; choose one of: {', '.join(demos)}")
    from .output.files import writable_path
    writable_path(args.output, "report", "report.html")  # fail before training, not after
    if args.save:
        writable_path(args.save, "run", "run.gprobe")
    _progress(f"running demo {args.name!r}: {demos[args.name]}")
    t0 = time.perf_counter()
    try:
        probe = importlib.import_module(f"gradprobe_demos.{args.name}").main()
    except Exception as e:  # a crashing demo is a bug: keep its traceback (main() does not catch this)
        raise DemoFailed(f"demo {args.name!r} failed") from e
    _progress(f"demo finished in {time.perf_counter() - t0:.1f}s; writing report")
    if args.save:
        _progress(f"run saved to {probe.save(args.save)}")
    _progress(f"report written to {probe.report(args.output)}")
    return 0


def _load(paths: list[str]):
    """One run, or the merge of several (the ranks of one job)."""
    from .output.run import load
    return load(paths[0] if len(paths) == 1 else paths)


def _default_report(paths: list[str]) -> str:
    """RUN with .html; for rank files `run.rank0.gprobe ...`: `run.html`."""
    p = Path(paths[0])
    if len(paths) > 1:
        import re
        p = p.with_name(re.sub(r"\.rank\d+$", "", p.stem) + p.suffix)
    return str(p.with_suffix(".html"))


def _cmd_report(args) -> int:
    from .output.files import writable_path
    out = args.output or _default_report(args.run)
    writable_path(out, "report", "report.html")
    run = _load(args.run)
    _progress(f"writing report of {', '.join(args.run) if len(args.run) <= 3 else f'{len(args.run)} run files'}")
    _progress(f"report written to {run.report(out)}")
    return 0


def _cmd_summary(args) -> int:
    from .output.summary import summarize
    run = _load(args.run)
    sys.stdout.write(summarize(run.to_pandas(), run.meta) + "\n")
    sys.stdout.flush()
    return 0


def _cmd_run(args) -> int:
    from .runscript import run_script
    track = None
    if args.track:
        track = tuple(t.strip() for one in args.track for t in one.split(",") if t.strip())
        from .probe import TRACKS
        bad = [t for t in track if t not in TRACKS]
        if bad:
            raise UsageError(f"unknown --track {', '.join(bad)}; choose from {', '.join(TRACKS)}")
    return run_script(args.script, args.args, output=args.output, report=args.report, every=args.every,
                      track=track)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `gradprobe summary RUN | head -1`: the reader left; that is not an error
        import os
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not complain
        except (OSError, ValueError):
            pass
        return 0


def _main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return {"demo": _cmd_demo, "report": _cmd_report, "summary": _cmd_summary,
                "run": _cmd_run}[args.command](args)
    except BrokenPipeError:
        raise
    except (UsageError, OSError, ValueError) as e:  # RunFileError and FileNotFoundError included
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gradprobe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradprobe: interrupted", file=sys.stderr)
        return 130
