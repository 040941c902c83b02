"""The ``inbrainsyn`` command line.

Each sub-command lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the sub-command and sets ``func``
(a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Front ends hold no science: they parse, call the engine, and report.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from inbrainsyn import __version__
from inbrainsyn.cli import common
from inbrainsyn.errors import InBrainSynError

# Modules that register sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "register_cmd",
    "transport_cmd",
    "synthesize_cmd",
    "batch_cmd",
    "demo_cmd",
    "evaluate_cmd",
    "phantom_cmd",
    "bank_cmd",
    "daninet_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inbrainsyn",
        description="Individual brain-ageing synthesis from one T1-weighted MRI (InBrainSyn).",
    )
    parser.add_argument("--version", action="version", version=f"inbrainsyn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"inbrainsyn.cli.{name}")
        except ModuleNotFoundError as exc:  # a sub-command not built yet
            if exc.name == f"inbrainsyn.cli.{name}":
                continue
            raise
        module.add_parser(subparsers)
    for leaf in common.leaf_parsers(parser):
        if leaf is not parser:
            common.add_common_options(leaf)
    return parser


def _terminate_cleanly() -> None:
    """SIGTERM (a kill, a cancelled Slicer run, a batch scheduler) unwinds like Ctrl-C, so staged
    outputs and the output claim are removed; SIGKILL cannot be caught (docs/reliability.md)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _terminate_cleanly()
    try:
        common.apply(args)
        return int(args.func(args) or 0)
    except InBrainSynError as exc:
        if getattr(args, "json", False) and not getattr(exc, "json_reported", False):
            from inbrainsyn.progress import JsonLinesReporter

            JsonLinesReporter().error(str(exc), exc.exit_code)
        print(f"inbrainsyn {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"inbrainsyn {args.command}: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
