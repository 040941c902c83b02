"""``inbrainsyn batch`` throughput on 1 and 2 Dask workers: scaling, memory and scheduling overhead.

For each worker count: a fresh LocalCluster (engine's own constructor), then the real batch path
(:func:`inbrainsyn.batch.run_batch`) over N subjects, then N no-op tasks on the same warm cluster.
Reported per configuration:

* ``start_s``: cluster start until all workers are up;
* ``wall_s``, ``throughput_per_min``: the batch (table checks, scheduling, syntheses, cohort outputs);
* ``task_s`` / ``cpu_s``: mean run time and CPU time of one subject on its worker;
* ``peak_rss_mb``: the highest peak resident memory of any worker process;
* ``makespan_s``: first subject start to last subject end on the workers; ``fixed_s``: wall - makespan
  (table checks, first dispatch, cohort_volumes.csv and cohort_report.png: once per batch);
* ``idle_per_subject_s``: ``(makespan x workers - sum of task run times) / N``, worker time inside the
  makespan not spent running a subject (scheduling gaps, and a worker idle at the end), per subject;
* ``noop_per_task_ms``: wall time of N trivial tasks on the warm cluster / N (pure scheduling cost);
* ``scaling_efficiency`` (2 workers): ``throughput(2) / (2 x throughput(1))``.

Subjects: the demo subject resampled to ``--spacing`` mm (copies with different ages / cohorts, one
target each), or with ``--tiny`` the 32^3 test bank of Testing/test_templates.py (seconds per subject:
measures the engine, not the maths). Run it alone, under the shared lock, and quote the load::

    uptime; flock /tmp/inbrainsyn-bench.lock python benchmarks/bench_batch.py --spacing 4; uptime
    flock /tmp/inbrainsyn-bench.lock python benchmarks/bench_batch.py --tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _demo_input(folder: Path, spacing: float) -> Path:
    import SimpleITK as sitk

    from inbrainsyn.paths import resource_path

    image = sitk.ReadImage(str(resource_path("demo", "subject.nii.gz")))
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(image, spacing / 2.5)
    out = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (spacing,) * 3,
                        image.GetDirection(), 0.0, image.GetPixelID())
    path = folder / f"demo_{spacing:g}mm.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def _tiny_inputs(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "Testing"))
    from test_batch import _subject_image  # noqa: E402
    from test_templates import make_bank  # noqa: E402

    bank = make_bank(folder / "tiny-bank", model=True)
    return bank, _subject_image(bank, folder / "tiny.nii.gz", 1.02, 1.5)


def _table(folder: Path, image: Path, subjects: int, tiny: bool) -> Path:
    path = folder / "cohort.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "input", "age", "cohort", "targets", "skull_stripped"])
        for i in range(subjects):
            age = (62 + i % 4) if tiny else (66 + i % 4)
            writer.writerow([f"sub-{i:02d}", str(image), age, "HC" if i % 2 == 0 else "AD", age + 5, "yes" if tiny else ""])
    return path


def measure(workers: int, threads: int, table: Path, out: Path, common: dict, subjects: int) -> dict:
    from distributed import Client

    from inbrainsyn.batch import run_batch
    from inbrainsyn.parallel import LocalPlan, _local_cluster, map_subjects

    t0 = time.perf_counter()
    cluster = _local_cluster(LocalPlan(workers, threads), dashboard=False)
    client = Client(cluster)
    try:
        client.wait_for_workers(workers, timeout=300)
        start_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = run_batch(table, out, common=common, client=client)
        wall = time.perf_counter() - t1
        ok = [s for s in result.subjects if s["status"] == "ok"]
        t2 = time.perf_counter()
        map_subjects(abs, {f"noop-{i}": -i for i in range(subjects)}, client=client)
        noop = time.perf_counter() - t2
    finally:
        client.close()
        cluster.close()
    tasks = [s["seconds"] for s in ok]
    from datetime import datetime

    stamp = lambda text: datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").timestamp()  # noqa: E731
    makespan = max(stamp(s["finished"]) for s in ok) - min(stamp(s["started"]) for s in ok)
    return {
        "workers": workers, "threads_per_worker": threads, "subjects": subjects, "ok": len(ok),
        "start_s": round(start_s, 2), "wall_s": round(wall, 2), "throughput_per_min": round(60 * len(ok) / wall, 3),
        "task_s": round(statistics.mean(tasks), 2), "cpu_s": round(statistics.mean(s["cpu_s"] for s in ok), 2),
        "peak_rss_mb": max(s["worker_peak_rss_mb"] for s in ok),
        "makespan_s": round(makespan, 2), "fixed_s": round(wall - makespan, 2),
        "idle_per_subject_s": round((makespan * workers - sum(tasks)) / len(ok), 2),
        "noop_per_task_ms": round(1000 * noop / subjects, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--spacing", type=float, default=4.0, help="demo subject resampled to this spacing (mm)")
    parser.add_argument("--tiny", action="store_true", help="32^3 test bank instead of the default bank")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        if args.tiny:
            bank, image = _tiny_inputs(work)
            common = {"bank": str(bank)}
        else:
            image, common = _demo_input(work, args.spacing), {}
        table = _table(work, image, args.subjects, args.tiny)
        rows = [measure(w, args.threads_per_worker, table, work / f"out-{w}", common, args.subjects) for w in args.workers]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(rows) >= 2 and rows[0]["workers"] == 1:
        for r in rows[1:]:
            r["scaling_efficiency"] = round(r["throughput_per_min"] / (r["workers"] * rows[0]["throughput_per_min"]), 3)
    inputs = "tiny 32^3 test bank" if args.tiny else f"demo subject at {args.spacing:g} mm, default bank"
    print(f"inputs: {inputs}; {args.subjects} subjects, 1 target each; load average at the end: {os.getloadavg()}")
    keys = list(rows[-1].keys())
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"inputs": inputs, "load": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
