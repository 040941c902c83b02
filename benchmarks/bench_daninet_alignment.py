"""Alignment cost and accuracy of the DaniNet slice preview: full pipeline affine vs coarse vs reused.

For each input scan (default: the shipped demo subject, 1 mm with skull), in one run:

* ``full``: the synthesis pipeline's affine (8/4/2 mm, 2 ITK threads), the reference;
* ``coarse``: :func:`inbrainsyn.daninet.alignment.coarse_alignment` (8/4 mm only);
* ``reused``: :func:`inbrainsyn.daninet.alignment.read_alignment` of a manifest holding the full affine.

Reports wall and CPU seconds (medians over ``--repeats``), the distance between where the coarse and
the full transform send the template's brain voxels (mean / max mm), and how many of the model's
trained slices the coarse alignment maps to a different native slice than the full one.

    python benchmarks/bench_daninet_alignment.py [--input SCAN] [--age 70] [--repeats 3]

Run on a quiet machine (``uptime`` is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeats: int):
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return out, round(statistics.median(walls), 3), round(statistics.median(cpus), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help="T1 scan (default: the shipped demo subject)")
    parser.add_argument("--age", type=float, default=70.0)
    parser.add_argument("--cohort", default="HC")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("uptime before:", os.popen("uptime").read().strip())

    from inbrainsyn import io
    from inbrainsyn.daninet import alignment as align
    from inbrainsyn.daninet.preview import load_model, template_slice_for_native_slice
    from inbrainsyn.paths import resource_path
    from inbrainsyn.registration import AffineConfig, affine_register
    from inbrainsyn.registration.affine import matrix_and_offset, transform_error_mm
    from inbrainsyn.synthesis import dilate_mask, normalise_intensity
    from inbrainsyn.templates import load_bank

    path = args.input or str(resource_path("demo", "subject.nii.gz"))
    native = io.read_image(path)
    bank = load_bank(None)
    template = bank.template(args.cohort, args.age)

    def full():
        return affine_register(template, normalise_intensity(native), fixed_mask=dilate_mask(bank.mask, 10.0),
                               config=AffineConfig(threads=2))

    reference, full_wall, full_cpu = timed(full, args.repeats)
    coarse, coarse_wall, coarse_cpu = timed(lambda: align.coarse_alignment(native, template, bank.mask), args.repeats)
    matrix, offset = matrix_and_offset(reference)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({"diagnostics": {"affine_matrix": matrix.tolist(), "affine_offset": offset.tolist()}}))
        reused, reused_wall, reused_cpu = timed(lambda: align.read_alignment(manifest, native), args.repeats)
    errors = transform_error_mm(coarse, reference, template, bank.mask)
    reuse_error = transform_error_mm(reused, reference, template, bank.mask)
    band = tuple(load_model().cfg.slice_band)
    moved = 0
    tried = 0
    for k in range(native.GetSize()[2]):
        try:
            a = template_slice_for_native_slice(k, native, template, reference, band)
        except Exception:
            continue
        tried += 1
        try:
            b = template_slice_for_native_slice(k, native, template, coarse, band)
        except Exception:
            b = None
        moved += int(a != b)
    print(json.dumps({
        "input": path, "repeats": args.repeats,
        "full": {"wall_s": full_wall, "cpu_s": full_cpu},
        "coarse": {"wall_s": coarse_wall, "cpu_s": coarse_cpu, "mean_mm_vs_full": round(float(errors.mean()), 3),
                   "max_mm_vs_full": round(float(errors.max()), 3),
                   "native_slices_in_band": tried, "mapped_to_another_template_slice": moved},
        "reused": {"wall_s": reused_wall, "cpu_s": reused_cpu, "max_mm_vs_full": round(float(reuse_error.max()), 6)},
    }, indent=2))
    print("uptime after:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
