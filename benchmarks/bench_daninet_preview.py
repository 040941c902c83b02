"""Time ``preview_slices`` (the DaniNet slice preview) on CPU with the shipped model.

The subject is already in template space (the shipped bank's HC template at 70 y, on the model's
grid), as the issue's 3 s budget assumes. Reports the median of several runs, after one warm-up
call that loads the weights (cached afterwards, as in the Slicer module).

    /work/venv/bin/python benchmarks/bench_daninet_preview.py [--runs 7] [--threads N]

``--end-to-end``: also time what a user (or the Slicer module) waits for with an existing
alignment: ``inbrainsyn daninet preview DEMO --alignment T.tfm --native-slice K --targets 3 ages``
as a fresh process (Python and torch start-up, reading the 1 mm scan, resampling it onto the
template grid, predicting, writing the NIfTI slices, strip PNG and manifest). The alignment is the
coarse affine of the shipped demo subject, computed once before the timed runs. The same command
without ``--alignment`` (the raw scan: a coarse 8/4 mm affine inside the process) is timed in the
same run, alternating with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def template_space_volume(model) -> np.ndarray:
    """A volume on the model's grid: the shipped bank's template if it matches, else a smooth phantom."""
    shape = tuple(model.meta["grid_size_zyx"])
    try:
        import SimpleITK as sitk

        from inbrainsyn.templates import load_bank

        vol = sitk.GetArrayFromImage(load_bank(None).template("HC", 70.0))
        if vol.shape == shape:
            return vol
    except Exception:  # bank missing or on another grid: fall back to a synthetic blob
        pass
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.clip(1.2 - (x**2 + y**2 + z**2), 0, 1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=[75.0, 80.0, 85.0])
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the CLI preview of the demo subject with a reused alignment (fresh processes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from inbrainsyn.daninet.preview import load_model, preview_slices

    t = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - t
    vol = template_space_volume(model)
    k = int(np.mean(model.cfg.slice_band))
    preview_slices(vol, k, 70.0, "HC", args.targets, model=model)  # warm-up
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        preview_slices(vol, k, 70.0, "HC", args.targets)  # loads through the cache like the CLI/Slicer
        times.append(time.perf_counter() - t)
    print(json.dumps({"benchmark": "daninet_preview", "slice": k, "targets": args.targets, "runs": args.runs,
                      "threads": torch.get_num_threads(), "weights_load_s": round(load_s, 3),
                      "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                      "max_s": round(max(times), 4), "budget_s": 3.0}, indent=2))
    if args.end_to_end:
        print(json.dumps(end_to_end(args), indent=2))


def end_to_end(args) -> dict:
    """Median wall time of the CLI preview with ``--alignment`` (fresh process each run)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    from inbrainsyn.daninet import alignment as align
    from inbrainsyn.paths import resource_path
    from inbrainsyn.templates import load_bank

    demo = resource_path("demo", "subject.nii.gz")
    bank = load_bank(None)
    native = sitk.ReadImage(str(demo), sitk.sitkFloat32)
    transform = align.coarse_alignment(native, bank.template("HC", 70.0), bank.mask)
    times: dict[str, list[float]] = {"with_alignment": [], "raw_scan": []}
    with tempfile.TemporaryDirectory() as tmp:
        tfm = Path(tmp) / "alignment.tfm"
        sitk.WriteTransform(transform, str(tfm))
        k = native.GetSize()[2] // 2
        for run in range(args.runs):
            for case, extra in (("with_alignment", ["--alignment", str(tfm)]), ("raw_scan", [])):
                argv = [sys.executable, "-m", "inbrainsyn", "daninet", "preview", str(demo), "--age", "70", "--cohort",
                        "HC", "--targets", *[str(t) for t in args.targets], "--native-slice", str(k), *extra,
                        "-o", str(Path(tmp) / f"{case}{run}"), "--quiet", "--threads", str(args.threads or 2)]
                t = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                times[case].append(time.perf_counter() - t)
    return {"benchmark": "daninet_preview_cli", "input": str(demo), "native_slice": k, "targets": args.targets,
            "runs": args.runs, **{case: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3),
                                         "max_s": round(max(v), 3), "budget_s": 3.0 if case == "with_alignment" else 10.0}
                                  for case, v in times.items()}}


if __name__ == "__main__":
    main()
