"""The checkpoint layer's one error type."""

from __future__ import annotations


class CheckpointError(ValueError):
    """Bad checkpoint input (a missing or unreadable folder, an unknown tag, an option that does not
    apply); one line naming the path, key or option and what was expected."""
