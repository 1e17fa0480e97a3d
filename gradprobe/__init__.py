"""gradprobe: where did my gradients go, and what is my autograd graph holding in memory?"""

__version__ = "0.1.0"

from .finding import Finding  # noqa: E402
from .probe import Probe  # noqa: E402

__all__ = ["Probe", "Finding", "load", "compare_no_grad", "__version__"]


def load(path):
    """Load a run saved with `probe.save(path)`; it has the same read API as a Probe."""
    from .runfile import load as _load
    return _load(path)


def compare_no_grad(model_or_fn, *inputs, **kwargs):
    """Forward with grad vs under torch.no_grad()/inference_mode: saved bytes, peak memory, time."""
    from .compare import compare_no_grad as _compare
    return _compare(model_or_fn, *inputs, **kwargs)
