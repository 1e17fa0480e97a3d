"""gradprobe: where did my gradients go, and what is my autograd graph holding in memory?"""

__version__ = "0.1.0"

from .diagnose.finding import Finding  # noqa: E402
from .probe import Probe  # noqa: E402

__all__ = ["Probe", "Finding", "load", "compare_no_grad", "ddp_check", "__version__"]


def load(path):
    """Load a run saved with `probe.save(path)`; it has the same read API as a Probe. A list of paths (the
    per-rank files of one distributed job, e.g. `glob.glob("run.rank*.gprobe")`) is merged into one run:
    a `rank` column in every table, findings aggregated across ranks."""
    from .output.run import load as _load
    return _load(path)


def compare_no_grad(model_or_fn, *inputs, **kwargs):
    """Forward with grad vs under torch.no_grad()/inference_mode: saved bytes, peak memory, time."""
    from .compare import compare_no_grad as _compare
    return _compare(model_or_fn, *inputs, **kwargs)


def ddp_check(model, batch, loss_fn=None):
    """Before launching DDP: one forward/backward in this process predicts DDP's unused-parameter error and
    the "marked ready twice" error of reentrant checkpoint, naming parameters, cause and line."""
    from .ddpcheck import ddp_check as _check
    return _check(model, batch, loss_fn=loss_fn)
