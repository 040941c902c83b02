"""``inbrainsyn synthesize``: one T1 in its own space -> future scans, maps, volumes and a report."""

from __future__ import annotations

import argparse


def add_common_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", default="pole", choices=["pole", "schild", "conjugation", "half-conjugation", "none"],
                        help="parallel transport of the template ageing into the subject (default: pole ladder)")
    parser.add_argument("--bank", default=None, help="template bank folder (default: the shipped model bank)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (results are deterministic for a seed)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synthesize",
        help="synthesise future scans of one subject",
        description="From one T1-weighted MRI (NIfTI, NRRD, MHA or a DICOM series folder; with or without skull; any "
        "orientation), synthesise the subject's brain at later ages under healthy ageing (HC) or Alzheimer's "
        "disease (AD). Outputs lie on the input's own grid.",
    )
    parser.add_argument("input", help="T1-weighted image file or DICOM series folder")
    parser.add_argument("--age", type=float, required=True, help="the subject's age at the scan (years)")
    parser.add_argument("--targets", type=float, nargs="+", required=True, help="target ages (years), each above --age")
    parser.add_argument("--cohort", default="HC", choices=["HC", "AD"], help="ageing model: healthy (HC) or Alzheimer's (AD)")
    parser.add_argument("--transition-age", type=float, default=None, help="age of conversion from HC to AD (with --cohort HC)")
    parser.add_argument("--pace", type=float, default=50.0,
                        help="pace of ageing: percentile of the cohort's atrophy rates, 1-99 (default 50 = typical; "
                        "10 = slow, 90 = fast; see docs/templates.md)")
    parser.add_argument("--skull-stripped", action="store_true", help="the input is already brain-extracted")
    parser.add_argument("-o", "--output", required=True, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--force-input", action="store_true",
                        help="go on when the input fails a plausibility check (T1 contrast, brain coverage, adult "
                        "volumes, template fit; docs/reliability.md); the manifest and report are then marked")
    add_common_run_options(parser)
    parser.set_defaults(func=run)


def make_reporter(args):
    from inbrainsyn.cli.common import make_reporter as common_reporter

    return common_reporter(args)


def execute(request, args) -> int:
    """Run a request with the reporter the flags ask for; errors become one message and an exit code."""
    from inbrainsyn.synthesis import run_synthesis

    from inbrainsyn.progress import errors_reported

    reporter = make_reporter(args)
    with errors_reported(reporter, args.json):
        manifest = run_synthesis(request, args.output, overwrite=args.overwrite, reporter=reporter)
    if not args.json:
        print(f"outputs: {manifest.parent}\nreport:  {manifest.parent / 'report.png'}")
    return 0


def run(args) -> int:
    from inbrainsyn.synthesis import SynthesisRequest

    request = SynthesisRequest(
        input_path=args.input,
        age=args.age,
        targets=list(args.targets),
        cohort=args.cohort,
        transition_age=args.transition_age,
        bank=args.bank,
        transport=args.transport,
        skull_stripped=args.skull_stripped,
        device=args.device,
        seed=args.seed,
        pace=args.pace,
        force_input=getattr(args, "force_input", False),
    )
    return execute(request, args)
