"""Merge `inbrainsyn evaluate` runs (e.g. phantom chunks evaluated in parallel) into one report.

    python benchmarks/merge_evaluation.py OUTDIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a metrics.csv written by `inbrainsyn evaluate`; OUTDIR gets report.md, figure.png,
metrics.csv and manifest.json computed on all rows together (bootstrap over all subjects).
The commands that produced benchmarks/evaluation_* are in docs/evaluation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from inbrainsyn.evaluate import merge_runs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, runs = Path(argv[0]), [Path(p) / "metrics.csv" for p in argv[1:]]
    result = merge_runs(runs, out, overwrite=True)
    print((out / "report.md").read_text())
    print(f"{result['subjects']} subjects, {result['follow_ups']} follow-ups -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
