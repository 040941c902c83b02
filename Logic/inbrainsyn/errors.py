"""User-facing errors: each says what is wrong and what to do, and maps to an exit code."""

from __future__ import annotations


class InBrainSynError(Exception):
    """Base class of errors shown to the user as one clear message (no traceback)."""

    exit_code = 1


class InputError(InBrainSynError):
    """An input file or value is unusable (unreadable, wrong dimension, NaN, bad grid...)."""

    exit_code = 2


class OutputExistsError(InBrainSynError):
    """The output already exists and --overwrite was not given."""

    exit_code = 3


class ProcessingError(InBrainSynError):
    """A processing step failed (e.g. registration found no brain)."""

    exit_code = 4
