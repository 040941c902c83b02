"""``inbrainsyn phantom``: write a synthetic longitudinal cohort with ground-truth follow-ups."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="make a synthetic longitudinal cohort with known ageing (ground truth for evaluation)",
        description=(
            "Make a synthetic longitudinal cohort: template anatomy with per-subject regional volumes "
            "(ventricles 0.6-3x, hippocampi 0.5-1.1x, brain-to-ICV ratio, ICV +-10 %), large random "
            "diffeomorphisms, a synthetic skull and scalp (with and skull-stripped images), HC / AD / "
            "HC->AD groups, and two true follow-ups per scan (the atrophy model solved on the subject's "
            "own labels, and a subject-specific spatial pattern of rates). Writes images, label maps, "
            "masks, true deformations, cohort.csv, truths.csv and phantom.json (docs/evaluation.md)."
        ),
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--subjects", type=int, default=30, help="number of subjects (default 30)")
    parser.add_argument("--first-index", type=int, default=0,
                        help="index of the first subject (build a cohort in chunks: same seed, disjoint indices)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort")
    parser.add_argument("--spacing", type=float, default=None,
                        help="voxel size in mm (default: the bank's grid; 2 for quick tests)")
    parser.add_argument("--followups", type=float, nargs="+", default=[2.0, 4.0, 6.0], metavar="YEARS",
                        help="follow-up intervals after baseline in years (default 2 4 6)")
    parser.add_argument("--truths", nargs="+", default=["subject", "pattern"], choices=["subject", "pattern"],
                        help="true follow-ups to make (default both; 'subject' is always first)")
    parser.add_argument("--workers", type=int, default=1,
                        help="subjects built in parallel on a local Dask cluster of N worker processes (default 1: here)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="build the subjects on an existing Dask cluster (docs/batch.md)")
    parser.add_argument("--bank", default=None, help="template bank folder with an atrophy model (default: shipped bank)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inbrainsyn.phantom import PhantomConfig, make_phantom
    from inbrainsyn.templates.bank import load_bank

    truths = tuple(["subject"] + [t for t in args.truths if t != "subject"])
    config = PhantomConfig(subjects=args.subjects, seed=args.seed, spacing=args.spacing, first_index=args.first_index,
                           followup_years=tuple(args.followups), truths=truths, workers=args.workers)
    cluster = None
    if args.scheduler:
        from inbrainsyn.parallel import ClusterOptions

        if args.workers != 1:
            from inbrainsyn.errors import InputError

            raise InputError("--scheduler uses the cluster's own workers: do not combine it with --workers")
        cluster = ClusterOptions(scheduler=args.scheduler)
    out = make_phantom(args.output, config, bank=load_bank(args.bank), overwrite=args.overwrite, cluster=cluster)
    print(f"phantom written to {out} (cohort.csv, truths.csv, phantom.json)")
    return 0
