"""Process memory without torch: the resident set size, cheaply enough to call in a loop."""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = None


def rss():
    """Process RSS in bytes: /proc/self/statm where there is one (psutil costs ~100 us a call in a
    busy loop), else psutil; None when neither can say."""
    global _STATM
    try:
        if _STATM is None:
            _STATM = os.open("/proc/self/statm", os.O_RDONLY) if os.path.exists("/proc/self/statm") else -1
        if _STATM >= 0:
            return int(os.pread(_STATM, 128, 0).split()[1]) * _PAGE
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:
        return None
