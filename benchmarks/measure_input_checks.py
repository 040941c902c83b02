"""Measure the input plausibility checks on real T1 scans and on contrasts made from them.

Sets (and then evaluates) the thresholds of ``inbrainsyn.plausibility``:

* T1 scans: MNI152 2009a (nilearn) and the shipped demo subject; a weak-contrast T1 (grey matter
  moved half-way to white matter) and a bias + noise T1 made from each;
* non-T1 contrasts made from each by remapping tissue intensities (3-class Otsu inside the head;
  class medians CSF < GM < WM remapped as on T2 (CSF bright, WM dark), FLAIR (CSF dark, WM darker
  than GM) and proton density (GM > WM, CSF bright));
* crops keeping the top 45-95 % of the head (coverage, from the affine alone);
* Colin27 (``--evaluate-colin``) only to EVALUATE the thresholds, never to set them.

Usage (2 cores, ~25 s per registration):
    OMP_NUM_THREADS=1 python benchmarks/measure_input_checks.py --out benchmarks/input_checks.json [--evaluate-colin]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields, io, plausibility
from inbrainsyn.progress import Reporter
from inbrainsyn.synthesis import SynthesisRequest, affine_parts, dilate_mask, normalise_intensity, register_subject
from inbrainsyn.templates import load_bank

ROOT = Path(__file__).resolve().parents[1]
COLIN = Path("/tmp/mricron/usr/share/mricron/templates/ch2.nii.gz")

# intensity each tissue class is given, as a fraction of the T1's WM level: (CSF, GM, WM)
REMAPS = {
    "T2-like": (1.00, 0.60, 0.35),
    "FLAIR-like": (0.15, 0.80, 0.55),
    "PD-like": (0.85, 0.95, 0.75),
}


def mni_t1() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def class_medians(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """3-class Otsu on the head (voxels above 10 % of the 99th percentile): medians of dark/mid/bright."""
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    head = a > 0.1 * np.percentile(a, 99)
    otsu = sitk.OtsuMultipleThresholds(sitk.GetImageFromArray(np.where(head, a, 0).astype(np.float32)), 3)
    classes = sitk.GetArrayFromImage(otsu)
    meds = [float(np.median(a[head & (classes == k)])) for k in (1, 2, 3)]
    return a, tuple(meds)


def remap(image: sitk.Image, levels: tuple[float, float, float]) -> sitk.Image:
    """Piecewise-linear intensity remap sending the class medians (CSF, GM, WM) to ``levels`` x WM."""
    a, (c1, c2, c3) = class_medians(image)
    top = float(a.max())
    # everything from half the CSF class's median up to it is fluid (dark ventricles included)
    xs = [0.0, 0.5 * c1, c1, c2, c3, max(top, c3 + 1e-3)]
    ys = [0.0, levels[0] * c3, levels[0] * c3, levels[1] * c3, levels[2] * c3, levels[2] * c3]
    out = sitk.GetImageFromArray(np.interp(a, xs, ys).astype(np.float32))
    out.CopyInformation(image)
    return out


def weak_t1(image: sitk.Image) -> sitk.Image:
    """T1 with half its GM/WM contrast: GM moved half-way to WM (ordering kept)."""
    a, (c1, c2, c3) = class_medians(image)
    xs = [0.0, c1, c2, c3, max(float(a.max()), c3 + 1e-3)]
    ys = [0.0, c1, 0.5 * (c2 + c3), c3, max(float(a.max()), c3 + 1e-3)]
    out = sitk.GetImageFromArray(np.interp(a, xs, ys).astype(np.float32))
    out.CopyInformation(image)
    return out


def bias_noise(image: sitk.Image, seed=0) -> sitk.Image:
    """Smooth multiplicative bias (+-20 % across the head) and Rician-like noise (3 % of the 99th pct)."""
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in a.shape], indexing="ij")
    bias = 1.0 + 0.2 * (0.6 * x + 0.5 * y - 0.4 * z) / 1.5
    sigma = 0.03 * np.percentile(a, 99)
    noisy = np.hypot(a * bias + rng.normal(0, sigma, a.shape), rng.normal(0, sigma, a.shape)).astype(np.float32)
    out = sitk.GetImageFromArray(noisy)
    out.CopyInformation(image)
    return out


def crop_top(image: sitk.Image, keep: float) -> sitk.Image:
    """Keep the top ``keep`` fraction of the head (superior = +z in LPS after DICOM orientation)."""
    oriented = sitk.DICOMOrient(image, "LPS")  # index z increases towards superior (S)
    a = sitk.GetArrayViewFromImage(oriented)
    head = np.where((a > 0.1 * np.percentile(a, 99)).any(axis=(1, 2)))[0]
    lo, hi = int(head.min()), int(head.max())
    first = int(round(hi - keep * (hi - lo)))
    return oriented[:, :, first:]


def coverage_only(image: sitk.Image, bank) -> float:
    from inbrainsyn.registration import AffineConfig, affine_register

    template = bank.template("HC", 75.0)
    transform = affine_register(template, normalise_intensity(image), fixed_mask=dilate_mask(bank.mask, 10.0),
                                config=AffineConfig(threads=2), seed=0)
    matrix, offset = affine_parts(transform)
    return plausibility.brain_coverage(fields.Grid.from_sitk(image), bank.grid, sitk.GetArrayViewFromImage(bank.mask),
                                       matrix, offset)


def full_checks(image: sitk.Image, bank, age: float = 70.0) -> dict:
    request = SynthesisRequest(input_path="-", age=age, targets=[age + 5], force_input=True)
    start = time.perf_counter()
    registered = register_subject(image, request, bank, torch.device("cpu"), Reporter())
    labels_t = bank.labels_tensor("HC", age).float()
    results = plausibility.check_registered(image, registered, bank, labels_t)
    row = {r.name: {"passed": r.passed, **r.value} for r in results}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the measurements")
    parser.add_argument("--evaluate-colin", action="store_true", help="also evaluate on Colin27 (not used to set thresholds)")
    parser.add_argument("--skip-contrasts", action="store_true")
    parser.add_argument("--skip-crops", action="store_true")
    args = parser.parse_args(argv)

    bank = load_bank(None)
    scans = {"MNI152": io.read_image(mni_t1()), "demo": io.read_image(ROOT / "Resources/demo/subject.nii.gz")}
    if args.evaluate_colin:
        scans["Colin27 (evaluation)"] = io.read_image(COLIN)
    rows = []
    for name, image in scans.items():
        variants = {"T1": image}
        if not args.skip_contrasts:
            variants["T1 weak GM/WM contrast"] = weak_t1(image)
            variants["T1 bias+noise"] = bias_noise(image)
            variants.update({label: remap(image, levels) for label, levels in REMAPS.items()})
        for label, variant in variants.items():
            row = {"scan": name, "variant": label, **full_checks(variant, bank)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not args.skip_crops:
            for keep in (0.95, 0.85, 0.75, 0.60, 0.45):
                row = {"scan": name, "variant": f"top {int(keep * 100)} % of the head",
                       "coverage": {"fraction": round(coverage_only(crop_top(image, keep), bank), 4)}}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
