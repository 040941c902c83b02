"""Whose volumes? Baseline volumes against truth, cohort independence and placement of the ageing.

Held-out phantom-like subjects WITH skull (:func:`inbrainsyn.phantom.varied_subject`: the bank's
HC template at an age, ventricles x 0.6-3 and hippocampi/amygdalae x 0.5-1.1 by the atrophy solver,
a random inter-subject diffeomorphism, synthetic skull and scalp, bias and Rician noise) are run
through ``run_synthesis`` (one target, +4 years) with ``--cohort HC`` and ``--cohort AD``.  Per subject:

* baseline volumes (volumes.csv) against the truth (the subject's warped partial-volume maps);
* cohort independence: |HC - AD| / HC of every baseline volume;
* placement: the mean of the atrophy map (jacobian output, future/baseline volume ratio) over the
  subject's TRUE hippocampus and ventricles (weighted by the true partial volumes, on the input grid)
  against the change the run reports for them (volumes.csv); error = |(J - 1) - (r - 1)| / |r - 1|;
* the run's fit record (residuals, beyond-registration flag).

"Before" numbers: run the same script with the previous engine first on the path, e.g.
``PYTHONPATH=/path/to/old/Logic python benchmarks/bench_subject_volumes.py --label before``.
Tuning used subjects with seeds below 100 only; the default seeds (100+) are held out.  Colin27
(``--colin``) is evaluated for cohort independence only (no truth labels), labelled as such.

Run:  python benchmarks/bench_subject_volumes.py [--subjects 4] [--spacing 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REGIONS = ("ventricles", "hippocampus", "amygdala", "gm", "wm", "whole_brain")
TOLERANCE = {"ventricles": 0.10, "gm": 0.10, "wm": 0.10, "whole_brain": 0.10, "hippocampus": 0.15, "amygdala": 0.15}
PLACEMENT_REGIONS = {"hippocampus": "hippocampus", "ventricles": "lateral_ventricles"}


def read_volumes(folder: Path) -> dict[float, dict[str, float]]:
    out: dict[float, dict[str, float]] = {}
    with open(folder / "volumes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            out.setdefault(float(row["age"]), {})[row["region"]] = float(row["volume_ml"])
    return out


def run(image: Path, age: float, target: float, cohort: str, out: Path) -> tuple[dict, dict, float]:
    from inbrainsyn.synthesis import SynthesisRequest, run_synthesis

    started = time.perf_counter()
    request = SynthesisRequest(input_path=str(image), age=age, targets=[target], cohort=cohort, device="cpu")
    if hasattr(request, "force_input"):
        request.force_input = True  # synthetic subjects: the input checks are not what is measured here
    manifest_path = run_synthesis(request, out, overwrite=True)
    seconds = time.perf_counter() - started
    return read_volumes(out), json.loads(Path(manifest_path).read_text()), seconds


def placement(out: Path, manifest: dict, subject, target: float, volumes: dict, age: float) -> dict:
    jac_path = next(o["path"] for o in manifest["outputs"] if o["kind"] == "jacobian")
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(out / jac_path))).astype(np.float64)
    result = {}
    from inbrainsyn.templates import load_bank

    label_names = load_bank(None).label_names
    for region, label in PLACEMENT_REGIONS.items():
        index = [i for i, v in enumerate(subject.values) if label_names[v] == label][0]
        weight = subject.maps[index].numpy().astype(np.float64)
        on_truth = float((jac * weight).sum() / weight.sum())
        reported = volumes[target][region] / volumes[age][region]
        result[region] = {"atrophy_map_over_truth": on_truth, "reported_ratio": reported,
                          "relative_error": abs((on_truth - 1) - (reported - 1)) / max(abs(reported - 1), 1e-9)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=100, help="seeds below 100 were used for tuning")
    parser.add_argument("--spacing", type=float, default=2.0, help="subject voxel size (mm)")
    parser.add_argument("--cohorts", nargs="+", default=["HC", "AD"])
    parser.add_argument("--label", default="after")
    parser.add_argument("--colin", action="store_true", help="also run Colin27 (cohort independence only)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import inbrainsyn
    from inbrainsyn.templates import load_bank
    from inbrainsyn.phantom import varied_subject

    print(f"engine: {Path(inbrainsyn.__file__).parent} ({args.label})", flush=True)
    bank = load_bank(None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(args.subjects):
            seed = args.first_seed + k
            rng = np.random.default_rng([seed, 5])
            ventricles = float(np.exp(rng.uniform(math.log(0.6), math.log(3.0))))
            hippocampus = float(rng.uniform(0.5, 1.1))
            age = float(round(rng.uniform(65, 80), 1))
            subject = varied_subject(bank, age, ventricle_factor=ventricles, hippocampus_factor=hippocampus, seed=seed,
                                     spacing=args.spacing, skull=True)
            image = tmp / f"subject{seed}.nii.gz"
            sitk.WriteImage(subject.image, str(image))
            entry = {"seed": seed, "age": age, "ventricle_factor": ventricles, "hippocampus_factor": hippocampus,
                     "truth_ml": subject.volumes_ml, "runs": {}}
            for cohort in args.cohorts:
                out = tmp / f"run{seed}{cohort}"
                volumes, manifest, seconds = run(image, age, age + 4.0, cohort, out)
                baseline = volumes[age]
                fit = manifest.get("diagnostics", {}).get("template_to_subject_fit")
                entry["runs"][cohort] = {
                    "seconds": seconds,
                    "baseline_ml": baseline,
                    "error": {r: baseline[r] / subject.volumes_ml[r] - 1 for r in REGIONS},
                    "placement": placement(out, manifest, subject, age + 4.0, volumes, age),
                    "beyond_registration": None if fit is None else fit["beyond_registration"],
                    "residual": None if fit is None else fit["residual"],
                    "fit": fit,  # the whole fit record (calibration of the flag, docs/anatomy.md)
                    "anatomy_s": manifest["timings_s"].get("anatomy"),
                }
                run_ = entry["runs"][cohort]
                print(f"seed {seed} {cohort} ({seconds:.0f} s) V x{ventricles:.2f} H x{hippocampus:.2f}: "
                      + " ".join(f"{r[:5]} {100 * run_['error'][r]:+.1f}%" for r in REGIONS)
                      + " | placement " + " ".join(f"{r[:5]} {100 * p['relative_error']:.0f}%"
                                                  for r, p in run_["placement"].items())
                      + f" | flag {run_['beyond_registration']}", flush=True)
            if len(args.cohorts) > 1:
                a, b = (entry["runs"][c]["baseline_ml"] for c in args.cohorts[:2])
                entry["cohort_difference"] = {r: abs(a[r] - b[r]) / a[r] for r in REGIONS}
                print(f"seed {seed} |HC-AD|/HC: " + " ".join(f"{r[:5]} {100 * v:.2f}%"
                                                          for r, v in entry["cohort_difference"].items()), flush=True)
            results.append(entry)
        colin = None
        if args.colin:
            path = Path("/tmp/mricron/usr/share/mricron/templates/ch2.nii.gz")
            runs = {c: run(path, 70.0, 74.0, c, tmp / f"colin{c}")[0][70.0] for c in args.cohorts}
            a, b = (runs[c] for c in args.cohorts[:2])
            colin = {"baseline_ml": runs, "cohort_difference": {r: abs(a[r] - b[r]) / a[r] for r in REGIONS}}
            print("Colin27 (evaluation only) |HC-AD|/HC: "
                  + " ".join(f"{r[:5]} {100 * v:.2f}%" for r, v in colin["cohort_difference"].items()), flush=True)

    summary = {}
    for cohort in args.cohorts:
        errs = {r: [abs(e["runs"][cohort]["error"][r]) for e in results] for r in REGIONS}
        place = {r: [e["runs"][cohort]["placement"][r]["relative_error"] for e in results] for r in PLACEMENT_REGIONS}
        summary[cohort] = {
            "mean_abs_error": {r: float(np.mean(v)) for r, v in errs.items()},
            "max_abs_error": {r: float(np.max(v)) for r, v in errs.items()},
            "within_target": {r: int(sum(x <= TOLERANCE[r] for x in v)) for r, v in errs.items()},
            "placement_max_error": {r: float(np.max(v)) for r, v in place.items()},
            "placement_within_10pct": {r: int(sum(x <= 0.10 for x in v)) for r, v in place.items()},
        }
    if len(args.cohorts) > 1:
        summary["cohort_difference_max"] = {r: float(max(e["cohort_difference"][r] for e in results)) for r in REGIONS}
    report = {"label": args.label, "engine": str(Path(inbrainsyn.__file__).parent), "subjects": len(results),
              "spacing": args.spacing, "summary": summary, "results": results, "colin27_evaluation_only": colin}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
