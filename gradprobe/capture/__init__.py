"""Everything that touches torch while the user's code runs. See session.py for how the parts fit."""

from .session import Capture

__all__ = ["Capture"]
