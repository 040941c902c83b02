"""``inbrainsyn evaluate``: compare transports and baselines against a phantom's true follow-ups."""

from __future__ import annotations

from pathlib import Path


# inbrainsyn.evaluate.METHODS, spelled out so that building the parser does not import the engine
# (Testing/test_cli_common.py checks that the two agree)
METHODS = ("pole", "schild", "conjugation", "half-conjugation", "untransported", "template", "copy")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score every method against the true follow-ups of a phantom cohort",
        description="On a phantom cohort (inbrainsyn phantom), predict each follow-up from the baseline with every "
        "transport, the untransported ageing, the template baseline and the copied baseline, and score PSNR, SSIM, "
        "MAE (intensities in [0,1] inside the brain mask) and Dice. Writes metrics.csv, table.md and metrics.png.",
    )
    parser.add_argument("--phantom", required=True, help="phantom cohort folder (with cohort.csv)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--subjects", type=int, default=None, help="use only N subjects")
    parser.add_argument("--first-subject", type=int, default=0, help="index of the first subject used (to split a run)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bank", default=None, help="template bank folder (default: the shipped bank)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from inbrainsyn.evaluate import run_evaluation
    from inbrainsyn.cli.common import make_reporter

    reporter = make_reporter(args)
    result = run_evaluation(Path(args.phantom), Path(args.output), bank_path=args.bank, device=args.device,
                            subjects=args.subjects, methods=tuple(args.methods), overwrite=args.overwrite, reporter=reporter,
                            first_subject=args.first_subject)
    reporter.finish()
    print((Path(args.output) / "table.md").read_text())
    print(f"{result['subjects']} subjects, {result['follow_ups']} follow-ups; outputs in {Path(args.output).absolute()}")
    return 0
