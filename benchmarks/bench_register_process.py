"""Whole ``inbrainsyn register`` process against its registration stage (issue 15: <= 1.3x).

Writes the MNI152 2009a known-deformation pair (the registration benchmark's, seed 0) at the given
resolution, then runs ``python -m inbrainsyn register FIXED MOVING --mask MASK -o OUT --quiet`` as a
fresh process ``--repeats`` times, timed from outside (wall, and user+sys CPU of the child), and
reads the registration stage's own time from the manifest.  Prints medians and the ratio.

Run:  python benchmarks/bench_register_process.py [--spacing 1] [--repeats 5] [--threads 2] [--fast]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="pass --fast to register")
    args = parser.parse_args()

    import SimpleITK as sitk

    from bench_registration import mni_folder
    from inbrainsyn import fields
    from inbrainsyn.registration import synthetic

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = synthetic.load_mni(mni_folder(), args.spacing)
        pair = synthetic.make_known_pair(images, max_displacement_mm=5.0, smoothness_mm=16.0, seed=0)
        sitk.WriteImage(fields.tensor_to_image(pair.fixed, pair.grid), str(folder / "fixed.nii.gz"))
        sitk.WriteImage(fields.tensor_to_image(pair.moving, pair.grid), str(folder / "moving.nii.gz"))
        sitk.WriteImage(images["mask"], str(folder / "mask.nii.gz"))
        for i in range(args.repeats):
            out = folder / f"out{i}"
            cmd = [sys.executable, "-m", "inbrainsyn", "register", str(folder / "fixed.nii.gz"),
                   str(folder / "moving.nii.gz"), "--mask", str(folder / "mask.nii.gz"), "-o", str(out), "--quiet",
                   "--threads", str(args.threads), "--device", "cpu"] + (["--fast"] if args.fast else [])
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            timings = json.loads((out / "manifest.json").read_text())["timings_s"]
            rows.append({"wall_s": wall, "cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
                         "registration_s": timings["registration"], "read_s": timings["read"],
                         "write_s": timings["write"], "in_process_total_s": timings["total"],
                         "bytes": sum(p.stat().st_size for p in out.iterdir())})
            print(json.dumps(rows[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(json.dumps({"spacing_mm": args.spacing, "threads": args.threads, "fast": args.fast, "runs": len(rows),
                      "medians": med, "process_over_registration": med["wall_s"] / med["registration_s"],
                      "ratios": [r["wall_s"] / r["registration_s"] for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
