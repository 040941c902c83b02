"""The slice-ageing model on a held-out phantom cohort, against the CLEAN true follow-up.

For each subject of an ``inbrainsyn phantom`` folder: its baseline (skull-stripped ``path`` image)
is aligned to the template by the preview's coarse affine (``alignment.coarse_alignment``); the same
affine carries its clean follow-ups, their brain masks and label maps, and the baseline's label map
onto the template grid. For each axial slice k of the model's band (every ``stride``-th) and each
follow-up at age T:

* image metrics inside the follow-up's brain mask, each image mapped to [0, 1] by its own 1st/99th
  percentiles there (``inbrainsyn.evaluate``): PSNR, 2D SSIM, MAE, for ``daninet`` (the model,
  :func:`preview.flow_predictions`), ``copy`` (the baseline slice unchanged) and ``copy-blur`` (the
  baseline smoothed as a sub-pixel warp smooths it, ``BLUR_SIGMA_PX``: the share of a gain that is
  only noise averaging), averaged over the slices of a follow-up;
* lateral-ventricle area on the slice (label 1, mm^2): true change = follow-up minus baseline
  labels; predicted change = the area of the baseline's ventricle mask warped by the model's
  displacement (T - a0) u (bilinear, partial-volume sum) minus the baseline's; copy predicts 0.
  Summed over the slices.

The class is the one the preview would get: ``--cohort`` AD for the AD group, HC (CN) for HC and
for the HC->AD converters (the preview has no transition age).

Rows follow ``inbrainsyn.evaluate``'s shape (``subject, age, method, truth, psnr, ssim, mae``) so its
:func:`~inbrainsyn.evaluate.paired_differences` gives the paired 95 % bootstrap intervals over subjects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from inbrainsyn import evaluate as ev
from inbrainsyn.daninet import alignment as align
from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry
from inbrainsyn.daninet.evaluate import slice_metrics
from inbrainsyn.daninet.preview import flow_apply, flow_rates_on_slice
from inbrainsyn.errors import InputError

VENTRICLE_LABEL = 1
# copy-blur: the baseline slice smoothed by the low-pass a half-pixel bilinear shift applies (weights
# 1/2, 1/2 per axis: variance 1/4 px^2). A warp by sub-pixel displacements averages the baseline's
# noise away; this control shows how much of a gain over copy that alone gives.
BLUR_SIGMA_PX = 0.5


def _on_template(path, reference, transform, nearest=False) -> np.ndarray:
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    out = sitk.Resample(img, reference, transform, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


INPUTS = ("stripped", "head")


def stripped_image(scan):
    """The skull-stripped image of a phantom scan (``inbrainsyn.evaluate.read_cohort`` gives the
    head image for the subjects marked ``input = head``; the model was trained on stripped slices)."""
    if scan.input == "head" and "_head" in scan.image.name:
        return scan.image.with_name(scan.image.name.replace("_head", "_T1w"))
    return scan.image


def head_image(scan):
    """The image with skull and scalp of a phantom scan (``<scan>_head.nii.gz`` beside the stripped one)."""
    stripped = stripped_image(scan)
    head = stripped.with_name(stripped.name.replace("_T1w", "_head"))
    if not head.is_file():
        raise InputError(f"no image with skull for {scan.subject}: {head} is missing (phantoms write one per scan)")
    return head


@torch.no_grad()
def evaluate_subject(model, scans, bank, stride: int = 3, inbrainsyn_cache=None, inputs: str = "stripped") -> list[dict]:
    """Rows for one subject (``scans``: ``inbrainsyn.evaluate.Scan`` list, baseline first).

    ``inputs``: the baseline the preview gets, ``"stripped"`` or ``"head"`` (with skull and scalp:
    aligned by the same coarse affine, and the prediction's change kept near the template brain as
    the CLI does, ``geometry.brain_weight``); the truth is the clean, stripped follow-up either way.

    ``inbrainsyn_cache``: a folder of InBrainSyn's predicted follow-ups on the subject's own grid
    (``<subject>_age<T>.nii.gz``, as ``daninet.evaluate.inbrainsyn_predictions`` caches them); when
    all of a subject's are there, they are carried onto the template grid by the same affine and
    scored on the same slices (method ``inbrainsyn``)."""
    base = scans[0]
    cohort = "AD" if cond.diagnosis_class(base.group) == 3 else "HC"
    lo_age, hi_age = bank.age_range(cohort)
    reference = bank.template(cohort, min(max(base.age, lo_age), hi_age))
    if inputs not in INPUTS:
        raise InputError(f"unknown inputs {inputs!r}; use one of {', '.join(INPUTS)}")
    native = sitk.ReadImage(str(head_image(base) if inputs == "head" else stripped_image(base)), sitk.sitkFloat32)
    transform = align.coarse_alignment(native, reference, bank.mask)
    vol0 = geometry.normalise_intensity(sitk.GetArrayFromImage(align.to_template_grid(native, reference, transform)))
    lab0 = _on_template(base.labels, reference, transform, nearest=True)
    spacing = reference.GetSpacing()
    pixel_mm2 = spacing[0] * spacing[1]
    # the class the preview gets: its --cohort is HC or AD; a converter is previewed as HC (CN), as
    # `inbrainsyn evaluate` feeds it to InBrainSyn (HC with a transition age the preview has no option for)
    dx = cond.diagnosis_class(cohort)
    lo, hi = model.cfg.slice_band
    ks = list(range(lo, hi + 1, stride))
    brain = bank.mask
    weights = {k: geometry.brain_weight_on_slice(brain, k) for k in ks}  # as the CLI preview
    rates = {}
    for k in ks:
        frame = geometry.to_frame(vol0[k][None], model.cfg.frame_size)
        rates[k] = flow_rates_on_slice(model, frame, vol0[k].shape, base.age, dx, k)
    rows = []
    for fu in scans[1:]:
        clean = geometry.normalise_intensity(_on_template(fu.clean, reference, transform))
        mask_vol = _on_template(fu.mask, reference, transform, nearest=True) > 0.5
        lab = _on_template(fu.labels, reference, transform, nearest=True)
        gap = fu.age - base.age
        per = {"daninet": [], "copy": [], "copy-blur": []}
        ibs = None
        if inbrainsyn_cache is not None:
            path = Path(inbrainsyn_cache) / f"{fu.subject}_age{fu.age:05.1f}.nii.gz"
            if path.is_file():
                ibs = geometry.normalise_intensity(_on_template(path, reference, transform))
                per["inbrainsyn"] = []
        vent = {"true": 0.0, "daninet": 0.0}
        for k in ks:
            mask = mask_vol[k]
            if mask.sum() < 50:
                continue
            u, r = rates[k]
            pred = flow_apply(vol0[k], u, r, gap, weights[k])
            per["daninet"].append(slice_metrics(pred, clean[k], mask))
            per["copy"].append(slice_metrics(vol0[k], clean[k], mask))
            per["copy-blur"].append(slice_metrics(gaussian_filter(vol0[k], BLUR_SIGMA_PX), clean[k], mask))
            if ibs is not None:
                per["inbrainsyn"].append(slice_metrics(ibs[k], clean[k], mask))
            v0 = (lab0[k] == VENTRICLE_LABEL).astype(np.float32)
            warped = flow_apply(v0, u, torch.zeros_like(r), gap)  # the displacement only, on the mask
            vent["true"] += float((lab[k] == VENTRICLE_LABEL).sum() - v0.sum()) * pixel_mm2
            vent["daninet"] += float(warped.sum() - v0.sum()) * pixel_mm2  # partial-volume area
        for method, values in per.items():
            if not values:
                continue
            row = {"subject": base.subject, "group": base.group, "age_from": base.age, "age": fu.age,
                   "method": method, "truth": "subject", "inputs": inputs, "slices": len(values),
                   **{m: float(np.mean([v[m] for v in values])) for m in ("psnr", "ssim", "mae")},
                   "vent_true_mm2": vent["true"],
                   "vent_pred_mm2": vent["daninet"] if method == "daninet" else (0.0 if method.startswith("copy") else float("nan"))}
            rows.append(row)
    return rows


def summary(rows: list[dict], seed: int = 0) -> dict:
    """Means per method and paired differences (daninet - copy, and inbrainsyn - copy when present)."""
    methods = sorted({r["method"] for r in rows})
    out = {"means": {}, "paired": [], "ventricles": {}}
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        out["means"][m] = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel]))) for k in ("psnr", "ssim", "mae")}
        out["means"][m]["n"] = len(sel)
    for m in methods:
        if m == "copy":
            continue
        refs = ["copy"] + (["copy-blur"] + (["inbrainsyn"] if "inbrainsyn" in methods else []) if m == "daninet" else [])
        for ref in refs:
            for metric in ("psnr", "ssim", "mae"):
                d = ev.paired_differences(rows, m, ref, metric, "subject", seed=seed)
                if d:
                    out["paired"].append(d)
    sel = [r for r in rows if r["method"] == "daninet"]
    if sel:
        t = np.array([r["vent_true_mm2"] for r in sel])
        p = np.array([r["vent_pred_mm2"] for r in sel])
        out["ventricles"] = {
            "true_mean_mm2": float(t.mean()), "pred_mean_mm2": float(p.mean()),
            "same_sign_fraction": float(np.mean(np.sign(t) == np.sign(p))),
            "ratio_pred_true": float(p.sum() / t.sum()) if t.sum() else float("nan"),
            "corr": float(np.corrcoef(t, p)[0, 1]) if len(t) > 2 and p.std() > 0 else float("nan"),
            "n": len(sel),
        }
    return out


def markdown(s: dict) -> str:
    lines = ["| Method | PSNR (dB) | SSIM | MAE | n |", "|---|---|---|---|---|"]
    for m, v in s["means"].items():
        lines.append(f"| {m} | {v['psnr'][0]:.2f} ± {v['psnr'][1]:.2f} | {v['ssim'][0]:.4f} ± {v['ssim'][1]:.4f} | "
                     f"{v['mae'][0]:.4f} ± {v['mae'][1]:.4f} | {v['n']} |")
    lines += ["", "| Paired difference | mean | 95 % CI (bootstrap over subjects) | follow-ups / subjects |", "|---|---|---|---|"]
    for d in s["paired"]:
        lines.append(f"| {d['method']} - {d['reference']}, {d['metric']} | {d['mean']:+.4f} | "
                     f"[{d['lo']:+.4f}, {d['hi']:+.4f}] | {d['n']} / {d['subjects']} |")
    v = s.get("ventricles")
    if v:
        lines += ["", f"Ventricle area change summed over the evaluated slices (mm^2), mean over {v['n']} follow-ups: "
                      f"true {v['true_mean_mm2']:+.1f}, predicted {v['pred_mean_mm2']:+.1f} (ratio {v['ratio_pred_true']:.2f}); "
                      f"same sign in {100 * v['same_sign_fraction']:.0f} %; correlation {v['corr']:.2f}; copy predicts 0."]
    return "\n".join(lines) + "\n"
