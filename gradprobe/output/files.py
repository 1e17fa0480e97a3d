"""Writing output files: paths checked up front with a message that says how to fix them, and atomic
writes (a failed write never leaves half a file)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def writable_path(path, what: str, example: str) -> Path:
    """Check an output path up front, with a message that names it and says how to fix it."""
    try:
        p = Path(os.fspath(path)).expanduser()
    except TypeError:
        raise ValueError(f"{what} path must be a file name such as {example!r}, not {path!r}") from None
    if p.is_dir():
        raise ValueError(f"cannot write {what} to {p}: it is a directory; give a file name such as {p / example}")
    if not p.parent.is_dir():
        raise OSError(f"cannot write {what} to {p}: directory {p.parent} does not exist; create it first "
                      "or choose another path")
    return p


def write_atomic(p: Path, data: bytes, what: str) -> None:
    """Write via a temporary file and rename, so a failed write never leaves half a file at `p`."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gradprobe-", suffix=".tmp", dir=p.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; runs and reports are meant to be shared
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise OSError(f"cannot write {what} to {p}: {e.strerror or e}; choose a writable path") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
