"""The options every command shares, defined and applied in one place.

Every leaf command (``register``, ``synthesize``, ``daninet preview``, ``bank info``, ...) gets
``--device``, ``--threads``, ``--json``, ``--quiet`` and ``--overwrite`` from :func:`add_common_options`,
which :func:`inbrainsyn.cli.build_parser` calls on each of them; :func:`apply` sets the thread count
before the command runs and :func:`make_reporter` picks the progress reporter.  A command ignores an
option it has no use for (``bank info --device cuda`` does nothing on a GPU).
"""

from __future__ import annotations

import argparse

from inbrainsyn.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
COMMON_OPTIONS = ("--device", "--threads", "--json", "--quiet", "--overwrite")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options (every command)")
    group.add_argument("--device", default="auto", choices=DEVICES,
                       help="compute device: auto (CUDA when present, else CPU), cpu or cuda (default: auto)")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch and ITK (default: torch's choice)")
    group.add_argument("--json", action="store_true",
                       help="progress and result as JSON lines on stdout (for front ends); errors end the stream "
                       "with an error event")
    group.add_argument("--quiet", action="store_true", help="no progress output")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser under ``parser`` that runs a command (has no sub-commands of its own)."""
    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not sub:
        yield parser
        return
    for action in sub:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from leaf_parsers(child)


def apply(args: argparse.Namespace) -> None:
    """Settings every command shares, applied once before the command runs."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        import SimpleITK as sitk
        import torch

        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def make_reporter(args: argparse.Namespace):
    """JSON lines with --json, silent with --quiet, a tqdm bar on a terminal, else one line per stage."""
    from inbrainsyn.progress import reporter_for

    return reporter_for(as_json=getattr(args, "json", False), quiet=getattr(args, "quiet", False))
