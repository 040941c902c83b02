"""``inbrainsyn batch``: synthesise a whole cohort table on Dask (a local cluster or an existing one)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from inbrainsyn.cli.synthesize_cmd import add_common_run_options

    parser = subparsers.add_parser(
        "batch",
        help="synthesise every subject of a cohort table (on a Dask cluster)",
        description="Run the synthesize pipeline for every row of COHORT.csv (columns subject, input, age, cohort, "
        "targets[, transition_age, skull_stripped]) into DIR/<subject>/, on a local Dask cluster of worker "
        "processes or an existing cluster (--scheduler). The whole table is checked first; failing subjects "
        "are recorded in DIR/batch_manifest.json while the others go on. Also writes DIR/cohort_volumes.csv "
        "and DIR/cohort_report.png. See docs/batch.md.",
    )
    parser.add_argument("table", metavar="COHORT.csv", help="cohort table (one row per subject)")
    parser.add_argument("-o", "--output", required=True, help="output folder DIR (one sub-folder per subject)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of an existing Dask scheduler, e.g. tcp://host:8786 (SLURM/PBS, Kubernetes, SSH)")
    where.add_argument("--workers", type=int, default=None,
                       help="local worker processes (default: from cores and memory; one per GPU on GPU machines)")
    parser.add_argument("--threads-per-worker", type=int, default=None, metavar="T",
                        help="threads of each local worker, used by its one subject (default: the cores the workers leave)")
    parser.add_argument("--resume", action="store_true", help="keep subjects whose results are complete; run the others")
    parser.add_argument("--force-input", action="store_true",
                        help="go on when a subject fails the input plausibility checks (its outputs are marked)")
    add_common_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inbrainsyn.batch import read_table, run_batch
    from inbrainsyn.batch.runner import SubjectsFailedError
    from inbrainsyn.parallel import ClusterOptions
    from inbrainsyn.progress import (JsonLinesReporter, JsonSubjectsReporter, Reporter, SubjectsReporter,
                                     TqdmSubjectsReporter, errors_reported)

    with errors_reported(JsonLinesReporter() if args.json else Reporter(), args.json):
        rows, _ = read_table(args.table)  # only to size the progress bar: all checks come in run_batch
    if args.json:
        reporter = JsonSubjectsReporter(len(rows))
        log = reporter.lines.log
    elif args.quiet:
        reporter, log = SubjectsReporter(len(rows)), (lambda message: None)
    else:
        reporter = TqdmSubjectsReporter(len(rows))
        log = lambda message: reporter.bar.write(message)  # noqa: E731
    options = ClusterOptions(scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                             device=args.device)
    common = {"bank": args.bank, "transport": args.transport, "device": args.device, "seed": args.seed,
              "force_input": args.force_input}
    with errors_reported(reporter, args.json):
        try:
            result = run_batch(args.table, args.output, options, common, resume=args.resume, overwrite=args.overwrite,
                               on_event=reporter.subject, log=log)
        finally:
            reporter.close()
        reporter.result(str(result.manifest))
        if not args.json:
            print(f"{reporter.summary()}\nbatch manifest: {result.manifest}\n"
                  f"cohort report:  {result.manifest.parent / 'cohort_report.png'}")
        if result.failed:
            raise SubjectsFailedError(f"{len(result.failed)} of {len(result.subjects)} subject(s) failed: "
                                      f"{', '.join(result.failed)} (errors in {result.manifest})")
    return 0
