"""`gradprobe run train.py [args]`: run a script under a probe, with no change to the script.

Like `python -m cProfile script.py`: the script runs as `__main__` (runpy.run_path) with
`sys.argv = [script, *args]` and the script's folder first on `sys.path`, under `gradprobe.Probe(None)`
(every module and leaf tensor a backward reaches). The run file and the HTML report are written when the
script ends, also when it raises or calls sys.exit(); the script's exit status is the command's (an
exception: its traceback, status 1). sys.argv and sys.path are restored afterwards, and the run's meta
records the script and its arguments.
"""

from __future__ import annotations

import os
import runpy
import shlex
import sys
import traceback

DEFAULT_RUN = "run.gprobe"
DEFAULT_REPORT = "gradprobe-report.html"


def _say(msg: str) -> None:
    print(f"gradprobe: {msg}", file=sys.stderr, flush=True)


def _exit_status(e: SystemExit) -> int:
    """What the interpreter would exit with: None -> 0, an int -> it, anything else printed -> 1."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_script_traceback(e: BaseException, script: str) -> None:
    """The traceback from the script's own frames on (gradprobe's and runpy's frames left out)."""
    tb = e.__traceback__
    t = tb
    while t is not None and os.path.abspath(t.tb_frame.f_code.co_filename) != script:
        t = t.tb_next
    traceback.print_exception(type(e), e, t or tb, file=sys.stderr)


def run_script(script: str, args: list[str] | tuple = (), *, output: str = DEFAULT_RUN,
               report: str | None = DEFAULT_REPORT, every: int | None = None, track=None) -> int:
    """Run `script` with `args` under a Probe(None); write the run and the report; return the exit status.

    Raises FileNotFoundError / ValueError / OSError (one line) before running anything for a missing script
    or an unwritable output path; the script's own errors never escape (they become the exit status).
    """
    from . import Probe
    from .output.files import writable_path
    from .output.merge import rank_path
    from .probe import TRACKS

    path = os.path.abspath(os.path.expanduser(os.fspath(script)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such script: {script}")
    if os.path.isdir(path):
        raise ValueError(f"{script} is a directory; give the training script to run, e.g. train.py")
    writable_path(output, "run", DEFAULT_RUN)  # fail before training, not after
    if report is not None:
        writable_path(report, "report", DEFAULT_REPORT)
    probe = Probe(None, track=TRACKS if track is None else track, every=every)
    argv = [script, *map(str, args)]
    probe.meta.update(script=path, script_args=list(argv[1:]), command=shlex.join(["gradprobe", "run", *argv]))
    old_argv, old_path = sys.argv[:], sys.path[:]
    status = 0
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(path))
    try:
        with probe:
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        status = _exit_status(e)
    except KeyboardInterrupt:
        _say("interrupted")
        status = 130
    except BaseException as e:  # noqa: BLE001 - the script's error: shown as Python would, then saved
        _print_script_traceback(e, path)
        status = 1
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
    return _write(probe, output, report, status, rank_path)


def _write(probe, output, report, status: int, rank_path) -> int:
    """Save the run and the report; a failure to write is said in one line (status 2 if the script was fine)."""
    if status:
        _say(f"the script exited with status {status}; writing what was recorded")
    for what, path, write in (("run", output, probe.save), ("report", report, probe.report)):
        if path is None:
            continue
        try:
            _say(f"{what} written to {write(path)}")
        except (OSError, ValueError) as e:
            _say(f"cannot write the {what} to {rank_path(path, probe.meta)}: {str(e).splitlines()[0] if str(e) else e}")
            status = status or 2
    return status
