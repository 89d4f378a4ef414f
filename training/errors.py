"""Errors the CLI reports as one line (no traceback) and the flow never retries.

Torch-free, so the stage adapter can catch them without loading the training engine.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on; printed as one line, no traceback."""


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf: the stage stops and registers nothing."""


class NonFiniteSamples(UserError, RuntimeError):
    """A pipeline drew NaN or infinite pixels (``inference/sampling.py``): one line, as a
    user error (no retry mends weights), and a RuntimeError to the champion re-score."""
