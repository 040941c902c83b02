"""``inbrainsyn evaluate``: compare transports and baselines against a phantom's true follow-ups."""

from __future__ import annotations

from pathlib import Path

# inbrainsyn.evaluate.METHODS, spelled out so that building the parser does not import the engine
# (Testing/test_cli_common.py checks that the two agree)
METHODS = ("oracle", "oracle-cohort", "oracle-conjugation", "pole", "schild", "conjugation", "half-conjugation",
           "untransported", "template", "copy")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score every method against the true follow-ups of a phantom cohort",
        description="On a phantom cohort (inbrainsyn phantom), predict each follow-up from the baseline with every "
        "transport, the untransported ageing, the template baseline, the copied baseline and the oracle (the true "
        "deformation), and score them against the clean true follow-ups: PSNR, SSIM, MAE, Dice, endpoint error of "
        "the deformation and error of the regional log-volume changes, with paired bootstrap intervals and strata "
        "by distance from the template. Writes metrics.csv, report.md, summary in manifest.json and figure.png "
        "(docs/evaluation.md).",
    )
    parser.add_argument("--phantom", required=True, nargs="+", help="phantom cohort folder(s) (with cohort.csv, truths.csv)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--subjects", type=int, default=None, help="use only N subjects")
    parser.add_argument("--first-subject", type=int, default=0, help="index of the first subject used (to split a run)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--truths", nargs="+", default=None, choices=["subject", "pattern"],
                        help="truths to score (default: all in the phantom)")
    parser.add_argument("--workers", type=int, default=1, help="subjects evaluated in parallel on a local Dask cluster of N worker processes (default 1: here)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--bank", default=None, help="template bank folder (default: the shipped bank)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from inbrainsyn.errors import InputError
    from inbrainsyn.evaluate import run_evaluation
    from inbrainsyn.cli.common import make_reporter

    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    reporter = make_reporter(args)
    result = run_evaluation([Path(p) for p in args.phantom], Path(args.output), bank_path=args.bank, device=args.device,
                            subjects=args.subjects, methods=tuple(args.methods), overwrite=args.overwrite, reporter=reporter,
                            first_subject=args.first_subject, truths=args.truths, workers=args.workers, seed=args.seed)
    reporter.finish()
    print((Path(args.output) / "report.md").read_text())
    print(f"{result['subjects']} subjects, {result['follow_ups']} follow-ups in {result['seconds']:.0f} s; "
          f"outputs in {Path(args.output).absolute()}")
    return 0
