"""The one exception type of the checkpoint layer."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint was refused or could not be written. The message names the URL (or file) and
    the reason; in a distributed run every rank raises it with the same message."""
