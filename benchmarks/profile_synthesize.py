"""Per-stage profile of the main job: wall time, CPU time and peak resident memory of every stage.

Runs ``inbrainsyn synthesize`` in this process (same code path as the command) with a reporter that
closes a stage at each stage change, reading the process's peak resident memory (``VmHWM``) and
resetting it (``/proc/self/clear_refs``, Linux) so each stage gets its own peak.  Import time is a
stage of its own.  With ``--cprofile N`` the N functions with the most cumulative time are listed
too, so the next slowest stage and what is inside it are always known.

Run:  python benchmarks/profile_synthesize.py [--input T1 --age 70] [--targets 75 80 85] [--threads 2]
      [--device cpu] [--cprofile 30] [--json out.json]
Default input: the shipped demo subject (1 mm, with skull).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

_START = time.perf_counter()


def _peak_rss_mb(reset: bool) -> float:
    """Peak resident set size since the last reset (MB); Linux only (else the process's peak)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return kb / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class StageRecorder:
    """Rows (stage, wall_s, cpu_s, peak_rss_mb) closed at every stage change."""

    def __init__(self):
        self.rows: list[dict] = []
        self.stage, self.t0, self.c0 = None, time.perf_counter(), _cpu()

    def enter(self, stage: str | None) -> None:
        if stage == self.stage:
            return
        now, cpu = time.perf_counter(), _cpu()
        if self.stage is not None:
            self.rows.append({"stage": self.stage, "wall_s": now - self.t0, "cpu_s": cpu - self.c0,
                              "peak_rss_mb": _peak_rss_mb(reset=True)})
        self.stage, self.t0, self.c0 = stage, now, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None)
    parser.add_argument("--age", type=float, default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=[75, 80, 85])
    parser.add_argument("--cohort", default="HC")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch/ITK threads (default: the command's default)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="also list the N top functions by cumulative time")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()

    recorder = StageRecorder()
    recorder.enter("import")
    import torch  # noqa: F401  (timed as part of "import")

    from inbrainsyn.progress import Reporter
    from inbrainsyn.synthesis import SynthesisRequest, run_synthesis

    if args.threads:
        torch.set_num_threads(args.threads)

    class ProfilingReporter(Reporter):
        def progress(self, stage, fraction, message=""):
            super().progress(stage, fraction, message)
            recorder.enter(stage)

    from bench_synthesize import use_demo_subject_by_default  # this folder is on sys.path when run as a script

    use_demo_subject_by_default(args)
    request = SynthesisRequest(input_path=args.input, age=args.age, targets=list(args.targets), cohort=args.cohort,
                               device=args.device)
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        if profiler:
            profiler.enable()
        run_synthesis(request, Path(tmp) / "out", reporter=ProfilingReporter())
        if profiler:
            profiler.disable()
        recorder.enter("cleanup")
    recorder.enter(None)

    total_wall = time.perf_counter() - _START
    print(f"{'stage':<14}{'wall s':>9}{'cpu s':>9}{'peak MB':>10}")
    for row in recorder.rows:
        print(f"{row['stage']:<14}{row['wall_s']:9.2f}{row['cpu_s']:9.2f}{row['peak_rss_mb']:10.0f}")
    print(f"{'total':<14}{total_wall:9.2f}{_cpu():9.2f}{max(r['peak_rss_mb'] for r in recorder.rows):10.0f}")
    slowest = max(recorder.rows, key=lambda r: r["wall_s"])
    print(f"slowest stage: {slowest['stage']} ({slowest['wall_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"input": args.input, "targets": args.targets, "device": args.device,
                                               "threads": args.threads, "total_wall_s": total_wall,
                                               "stages": recorder.rows}, indent=2))
    if profiler:
        import pstats

        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
