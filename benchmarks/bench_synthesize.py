"""End-to-end time and peak memory of `inbrainsyn synthesize` on a 1 mm T1 with skull, 3 target ages.

Input: the shipped demo subject (1 mm, with a synthetic skull) unless --input is given.  Each run
is a fresh process (`python -m inbrainsyn synthesize ...`), timed from outside with
`/usr/bin/time`-style accounting (resource.getrusage of the child), so import time and model set-up
are included.  Per-stage timings come from the run's manifest.json.

Run:  python benchmarks/bench_synthesize.py [--input T1.nii.gz --age 70] [--repeats 3] [--device cpu] [--json F]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def use_demo_subject_by_default(args) -> None:
    """Without ``--input``: the shipped demo subject and its age (shared with profile_synthesize.py)."""
    if args.input is None:
        from inbrainsyn.cli.demo_cmd import demo_subject

        image, info = demo_subject()
        args.input, args.age = str(image), args.age or float(info["age"])


def one_run(args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "inbrainsyn", "synthesize", args.input, "--age", str(args.age), "--targets",
           *map(str, args.targets), "--cohort", args.cohort, "--device", args.device, "--quiet", "-o", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_mb": after.ru_maxrss / 1024, "stages": manifest["timings_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None)
    parser.add_argument("--age", type=float, default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=[75, 80, 85])
    parser.add_argument("--cohort", default="HC")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the summary and every run to this file")
    args = parser.parse_args()
    use_demo_subject_by_default(args)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs.append(one_run(args, Path(tmp) / f"run{i}"))
            print(json.dumps({"run": i, **runs[-1]}), flush=True)
    walls = [r["wall_s"] for r in runs]
    stages = {k: statistics.median(r["stages"][k] for r in runs) for k in runs[0]["stages"]}
    summary = {"input": args.input, "targets": args.targets, "device": args.device, "runs": len(runs),
               "wall_s_median": statistics.median(walls), "wall_s_min": min(walls), "wall_s_max": max(walls),
               "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
               "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "stage_medians_s": stages}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "per_run": runs}, indent=2))


if __name__ == "__main__":
    main()
