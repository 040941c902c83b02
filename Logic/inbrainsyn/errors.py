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


class OutputBusyError(InBrainSynError):
    """Another run is writing the same output folder right now."""

    exit_code = 7


class OutputError(InBrainSynError):
    """Outputs could not be written (no space, no permission): nothing was published."""

    exit_code = 5


class ImplausibleInputError(InBrainSynError):
    """The input is a valid image but not what the method needs (contrast, coverage, size, fit)."""

    exit_code = 6
