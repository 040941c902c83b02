"""DaniNet on held-out subjects of a longitudinal cohort: predicted slices vs true follow-ups.

For each held-out subject the earliest scan is the baseline; every later scan is a true
follow-up at age T. For each axial slice k of the model's band (with the training stride) the
baseline slice is predicted at T (:func:`preview.preview_slices` machinery) and compared with the
follow-up's slice k, with the metrics of ``inbrainsyn evaluate`` (PSNR, SSIM, MAE after mapping
each image to [0, 1] by its own 1st-99th percentiles inside the follow-up's brain mask), computed
per slice and averaged over the slices of a follow-up. Methods: ``daninet`` (residual assembly),
``daninet-blend`` (the code's blend), ``copy`` (the baseline slice itself: the no-change baseline
any method must beat), and optionally ``inbrainsyn`` (InBrainSyn, pole ladder, predicted in 3D as
``inbrainsyn evaluate`` does, then cut at the same slices) so both methods share one table.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import evaluate as ev
from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry
from inbrainsyn.daninet.data import Scan, load_on_grid
from inbrainsyn.daninet.model import DaniNet
from inbrainsyn.daninet.preview import assemble, bin_outputs, blend_bins

METHODS = ("daninet", "daninet-blend", "copy")


def slice_metrics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """PSNR / SSIM / MAE of one 2D slice, as ``inbrainsyn evaluate`` does in 3D."""
    p, t = ev.unit_range(pred.astype(np.float64), mask), ev.unit_range(truth.astype(np.float64), mask)
    return {"psnr": ev.psnr(p, t, mask), "ssim": ev.ssim(p, t, mask), "mae": float(np.mean(np.abs(p[mask] - t[mask])))}


def inbrainsyn_predictions(scans: list[Scan], transport_method: str = "pole", cache_dir=None) -> dict[str, np.ndarray]:
    """InBrainSyn's predicted follow-up volumes (Z, Y, X) for one subject, keyed by follow-up path.

    Same steps as ``inbrainsyn evaluate`` (template-to-subject registration, cohort ageing SVF
    transported along v, applied to the subject's native grid). With ``cache_dir`` the predictions
    are stored there (``<subject>_age<T>.nii.gz``) and reused by later runs."""
    from pathlib import Path

    scans = sorted(scans, key=lambda s: s.age)
    if cache_dir is not None:
        names = {str(fu.path): Path(cache_dir) / f"{fu.subject}_age{fu.age:05.1f}.nii.gz" for fu in scans[1:]}
        if all(p.is_file() for p in names.values()):
            return {k: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for k, p in names.items()}
        out = inbrainsyn_predictions(scans, transport_method)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        reference = sitk.ReadImage(str(scans[0].path))
        for key, arr in out.items():
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(reference)
            sitk.WriteImage(img, str(names[key]))
        return out
    from inbrainsyn import fields, io
    from inbrainsyn.native import GridImage, NativeMapper
    from inbrainsyn.progress import Reporter
    from inbrainsyn.synthesis import SynthesisRequest, register_subject, transported_ageing
    from inbrainsyn.templates import load_bank

    bank, device = load_bank(None), torch.device("cpu")
    scans = sorted(scans, key=lambda s: s.age)
    base = scans[0]
    cohort = "HC" if base.group.upper().startswith("HC") else "AD"
    transition = base.transition_age if cohort == "HC" else None
    subject = io.read_image(base.path)
    request = SynthesisRequest(input_path=str(base.path), age=base.age, targets=[s.age for s in scans[1:]],
                               cohort=cohort, transition_age=transition, skull_stripped=True,
                               transport=transport_method)
    registered = register_subject(subject, request, bank, device, Reporter())
    mapper = NativeMapper(fields.Grid.from_sitk(subject), bank.grid, registered.affine_matrix,
                          registered.affine_offset, device)
    # The pipeline's own transport (coarse-grid ladder, accurate exponential), so the table compares
    # DaniNet with what `inbrainsyn synthesize` would produce.
    targets = transported_ageing(registered, request, bank, device)
    spline = GridImage(subject, device, "bspline")
    return {str(fu.path): mapper.warp_native(spline, target.displacement) for fu, target in zip(scans[1:], targets)}


@torch.no_grad()
def evaluate_subject(model: DaniNet, scans: list[Scan], masks: dict[str, str | None], reference: sitk.Image,
                     stride: int, methods=METHODS, with_inbrainsyn: bool = False, cache_dir=None) -> list[dict]:
    """Rows (subject, age_from, age_to, method, psnr, ssim, mae, dice=nan, slices) for one subject."""
    scans = sorted(scans, key=lambda s: s.age)
    base = scans[0]
    vol0 = geometry.normalise_intensity(sitk.GetArrayFromImage(load_on_grid(base.path, reference)))
    lo, hi = model.cfg.slice_band
    ks = list(range(lo, hi + 1, stride))
    cache = {}
    for k in ks:
        x = vol0[k]
        g = bin_outputs(model, geometry.to_frame(x[None], model.cfg.frame_size), base.dx, k)
        cache[k] = (x, g, geometry.from_frame(blend_bins(g, base.age), x.shape)[0])
    methods = list(methods)
    volumes = {}
    if with_inbrainsyn:
        volumes = inbrainsyn_predictions(scans, cache_dir=cache_dir)
        methods.append("inbrainsyn")
    rows = []
    for fu in scans[1:]:
        ibs = geometry.normalise_intensity(volumes[str(fu.path)]) if with_inbrainsyn else None
        truth = geometry.normalise_intensity(sitk.GetArrayFromImage(load_on_grid(fu.path, reference)))
        mpath = masks.get(str(fu.path))
        mask_vol = (sitk.GetArrayFromImage(load_on_grid(mpath, reference)) > 0.5) if mpath else truth > 0.05
        per = {m: [] for m in methods}
        for k in ks:
            mask = mask_vol[k]
            if mask.sum() < 50:
                continue
            x, g, g0 = cache[k]
            gt = geometry.from_frame(blend_bins(g, fu.age), x.shape)[0]
            preds = {"daninet": lambda: assemble(x, g0, gt, base.age, fu.age, "residual"),
                     "daninet-blend": lambda: assemble(x, g0, gt, base.age, fu.age, "blend"),
                     "copy": lambda: x, "inbrainsyn": lambda: ibs[k]}
            for m in methods:
                per[m].append(slice_metrics(preds[m](), truth[k], mask))
        for m in methods:
            if not per[m]:
                continue
            rows.append({"subject": base.subject, "group": base.group, "age_from": base.age, "age_to": fu.age,
                         "method": m, **{key: float(np.mean([r[key] for r in per[m]])) for key in ("psnr", "ssim", "mae")},
                         "dice": float("nan"), "slices": len(per[m])})
    return rows


def markdown_table(summary: list[dict]) -> str:
    """Mean ± SD of PSNR, SSIM and MAE per method (``inbrainsyn.evaluate.summarise`` entries); Dice is
    not defined on a 2D slice prediction and shows as n/a."""
    lines = ["| Method | PSNR (dB) | SSIM | MAE | Dice | n |", "|---|---|---|---|---|---|"]
    for e in summary:
        def cell(metric, digits):
            value = e.get(metric, float("nan"))
            return "n/a (2D)" if not np.isfinite(value) else f"{value:.{digits}f} ± {e[metric + '_sd']:.{digits}f}"

        lines.append(f"| {e['method']} | {cell('psnr', 2)} | {cell('ssim', 3)} | {cell('mae', 4)} | {cell('dice', 3)} | {e['n']} |")
    return "\n".join(lines) + "\n"

