"""``inbrainsyn phantom``: write a synthetic longitudinal cohort with ground-truth follow-ups."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="make a synthetic longitudinal cohort with known ageing (ground truth for evaluation)",
        description=(
            "Make a synthetic longitudinal cohort: template anatomy warped by random inter-subject "
            "diffeomorphisms, HC / AD / HC->AD groups, and true follow-ups from the atrophy model solved "
            "on each subject's own labels. Writes images, label maps, masks, cohort.csv and phantom.json."
        ),
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--subjects", type=int, default=25, help="number of subjects (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort")
    parser.add_argument("--spacing", type=float, default=None,
                        help="voxel size in mm (default: the bank's grid; 2 for quick tests)")
    parser.add_argument("--followups", type=float, nargs="+", default=[2.0, 4.0, 6.0], metavar="YEARS",
                        help="follow-up intervals after baseline in years (default 2 4 6)")
    parser.add_argument("--skull", action="store_true", help="surround the brain with a synthetic skull and scalp")
    parser.add_argument("--bank", default=None, help="template bank folder with an atrophy model (default: shipped bank)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="build subjects on a local Dask cluster of N worker processes (default: in this process)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help="build subjects on an existing Dask cluster")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inbrainsyn.phantom import PhantomConfig, make_phantom
    from inbrainsyn.templates.bank import load_bank

    config = PhantomConfig(subjects=args.subjects, seed=args.seed, spacing=args.spacing,
                           followup_years=tuple(args.followups), skull=args.skull)
    from inbrainsyn.parallel import ClusterOptions

    cluster = ClusterOptions(scheduler=args.scheduler, workers=args.workers, device="cpu") \
        if (args.workers or args.scheduler) else None
    out = make_phantom(args.output, config, bank=load_bank(args.bank), overwrite=args.overwrite, cluster=cluster)
    print(f"phantom written to {out} (cohort.csv, phantom.json)")
    return 0
