"""Registration problems with known answers for the battery (``bench_registration_battery.py``).

Two families, both built from the MNI152 2009a anatomy only (never Colin27):

* **Known deformations** (:func:`known_pair`): the MNI152 T1 (nilearn, 1 or 2 mm) warped by
  ``exp(-v_true)`` of a smooth random SVF (Gaussian smoothness 6-16 mm, largest vector 5 or 12 mm;
  :mod:`inbrainsyn.registration.synthetic`).  Truth: ``d_true = exp(v_true)``.
* **Inter-anatomy pairs** (:func:`anatomy_pair`): a subject made from the default bank's template
  (MNI152 at 1.5 mm, age 55) whose lateral ventricles are ``ventricles`` times and hippocampi
  (and amygdalae) ``hippocampus`` times the template's, made by the phantom's anatomy generator
  (:func:`inbrainsyn.phantom.varied_anatomy`: the atrophy solver realises per-region volume factors
  on the bank's labels, CSF balancing inside a fixed skull, GM and WM shrinking by 3 % per halving of
  the hippocampus, an ageing-like pattern; then a random smooth inter-subject deformation, 4 mm at
  smoothness 15 mm, no affine).  So ``subject = template o phi_true`` and its partial-volume labels are
  the template's one-hot maps warped by ``phi_true``.  Optionally a synthetic skull/scalp, a bias
  field, a contrast gamma and Rician noise (:mod:`inbrainsyn.phantom`), preprocessed as
  ``inbrainsyn synthesize`` does (robust normalisation, skull removed by the template's mask
  dilated 6 mm).

Every pair registers ``fixed`` (subject) <- ``moving`` (template): ``moving o (id + d) ~ fixed``.
Scores (:func:`score`): endpoint error inside the fixed brain, regional volumes carried by ``d``
(the template's one-hot maps warped trilinearly and summed) against the truth, tissue Dice
(GM, WM, CSF maps > 0.5), folding (det <= 0) and min det J.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.registration import synthetic

REGIONS = ("ventricles", "hippocampus")


@dataclass
class Pair:
    name: str
    fixed: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor  # registration mask on the fixed grid (what our method is given)
    brain: torch.Tensor  # the fixed image's true brain, where EPE is measured
    true_displacement: torch.Tensor
    grid: fields.Grid
    tissue_fixed: dict  # name -> (Z, Y, X) probability maps of the fixed image
    tissue_moving: dict  # the same for the moving image (carried by d)
    region_moving: dict = field(default_factory=dict)  # region -> one-hot map of the moving image
    region_true_ml: dict = field(default_factory=dict)  # region -> true volume in the fixed image (mL)
    region_moving_ml: dict = field(default_factory=dict)  # region -> volume in the moving image (mL)
    meta: dict = field(default_factory=dict)


def known_pair(images: dict, smoothness_mm: float, max_mm: float, seed: int) -> Pair:
    """Known-deformation pair from :func:`synthetic.load_mni` images."""
    kp = synthetic.make_known_pair(images, max_displacement_mm=max_mm, smoothness_mm=smoothness_mm, seed=seed)
    spacing = kp.grid.spacing[0]
    return Pair(
        name=f"known_{spacing:g}mm_s{smoothness_mm:g}_m{max_mm:g}_seed{seed}",
        fixed=kp.fixed, moving=kp.moving, mask=kp.mask, brain=kp.mask, true_displacement=kp.true_displacement,
        grid=kp.grid,
        tissue_fixed={"gm": kp.gm_fixed, "wm": kp.wm_fixed},
        tissue_moving={"gm": kp.gm_moving, "wm": kp.wm_moving},
        meta={"family": "known", "resolution_mm": spacing, "smoothness_mm": smoothness_mm, "max_mm": max_mm, "seed": seed},
    )


def _tissue_from_maps(maps: torch.Tensor, names: list[str]) -> dict:
    """GM (every grey-matter label, cortical parcels included), WM and CSF (with the ventricles)."""
    fluid = [i for i, n in enumerate(names) if n in ("csf", "lateral_ventricles")]
    wm = [i for i, n in enumerate(names) if n == "cerebral_wm"]
    gm = [i for i in range(len(names)) if i not in fluid and i not in wm]
    return {"gm": maps[gm].sum(0), "wm": maps[wm].sum(0), "csf": maps[fluid].sum(0)}


def load_bank_anatomy(bank, spacing_mm: float | None = None) -> dict:
    """The bank's HC template at its first age, its labels as one-hot maps and its mask (optionally resampled)."""
    from inbrainsyn.templates.regions import one_hot

    age = bank.ages("HC")[0]
    template = bank.template_tensor("HC", age)
    labels = bank.labels_tensor("HC", age)
    values = sorted(bank.label_names)
    names = [bank.label_names[v] for v in values]
    maps = one_hot(labels, values)
    mask = fields.image_to_tensor(bank.mask).float()
    grid = bank.grid
    if spacing_mm is not None and abs(spacing_mm - grid.spacing[0]) > 1e-6:
        from inbrainsyn.phantom import resample_to_grid, subject_grid

        target = subject_grid(bank, spacing_mm)
        stack = resample_to_grid(torch.cat([template[None], maps, mask[None]]), grid, target)
        template, maps, mask = stack[0], stack[1:-1].clamp(0, 1), (stack[-1] > 0.5).float()
        grid = target
    return {"template": template, "maps": maps, "names": names, "mask": mask, "grid": grid, "bank": bank}


def anatomy_pair(anatomy: dict, ventricles: float, hippocampus: float, seed: int, skull: bool,
                 inter_subject_mm: float = 4.0) -> Pair:
    """Template -> subject pair with ventricles x``ventricles`` and hippocampi x``hippocampus`` (see module doc)."""
    from inbrainsyn.phantom import acquire, smooth_noise, synthetic_skull, varied_anatomy

    template, maps, names, grid = anatomy["template"], anatomy["maps"], anatomy["names"], anatomy["grid"]
    spacing_zyx = tuple(reversed(grid.spacing))
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    shrink = 0.03 * math.log2(1.0 / hippocampus) if hippocampus < 1 else 0.0
    factors = {"lateral_ventricles": ventricles, "hippocampus": hippocampus, "amygdala": hippocampus,
               "cortical_gm": math.exp(-shrink), "subcortical_gm": math.exp(-shrink), "cerebral_wm": math.exp(-shrink)}
    rng = np.random.default_rng([seed, 17])
    generated = varied_anatomy(template, maps, list(range(len(names))), names, spacing_zyx, factors, rng,
                               max_displacement_mm=inter_subject_mm, smoothness_mm=15.0,
                               solver={"balance_region": "csf", "solve_spacing_mm": 3.0, "full_rounds": 3,
                                       "iterations": 12})
    d_true = generated.phi
    subject_maps = fields.warp(maps, d_true)
    subject = fields.warp(template, d_true)
    tissue_f = _tissue_from_maps(subject_maps, names)
    brain = subject_maps.sum(0) > 0.5
    idx = {n: i for i, n in enumerate(names)}
    region_moving = {"ventricles": maps[idx["lateral_ventricles"]], "hippocampus": maps[idx["hippocampus"]]}
    region_true = {"ventricles": float(subject_maps[idx["lateral_ventricles"]].sum()) * voxel_ml,
                   "hippocampus": float(subject_maps[idx["hippocampus"]].sum()) * voxel_ml}
    region_moving_ml = {k: float(v.sum()) * voxel_ml for k, v in region_moving.items()}
    support = _dilate(anatomy["mask"], 6.0, grid.spacing[0])
    if skull:
        icv = brain.numpy()
        skull_img = synthetic_skull(icv, grid.spacing[0])
        clean = np.where(icv, subject.numpy(), skull_img)
        bias = np.exp(0.15 * smooth_noise(tuple(template.shape), spacing_zyx, 80.0, rng)[0])
        observed = acquire(clean, float(rng.uniform(800, 1200)), float(rng.uniform(0.85, 1.15)), bias,
                           float(rng.uniform(0.015, 0.035)), rng)
        fixed = _normalise_like_synthesis(observed, grid) * support
        fixed = fixed.clamp(0, 1)
    else:
        fixed = subject
    return Pair(
        name=f"anat_v{ventricles:g}_h{hippocampus:g}_seed{seed}{'_skull' if skull else ''}",
        fixed=fixed.float(), moving=template.float(), mask=support > 0, brain=brain, true_displacement=d_true, grid=grid,
        tissue_fixed=tissue_f, tissue_moving=_tissue_from_maps(maps, names),
        region_moving=region_moving, region_true_ml=region_true, region_moving_ml=region_moving_ml,
        meta={"family": "anatomy", "resolution_mm": grid.spacing[0], "ventricles_x": ventricles,
              "hippocampus_x": hippocampus, "seed": seed, "skull": skull,
              "solver_achieved": generated.achieved, "solver_goals": generated.goals},
    )


def _dilate(mask: torch.Tensor, radius_mm: float, spacing: float) -> torch.Tensor:
    import scipy.ndimage as ndi

    r = max(1, int(round(radius_mm / spacing)))
    ball = np.add.outer(np.add.outer(np.arange(-r, r + 1) ** 2, np.arange(-r, r + 1) ** 2), np.arange(-r, r + 1) ** 2) <= r * r
    return torch.from_numpy(ndi.binary_dilation(mask.numpy() > 0, ball)).float()


def _normalise_like_synthesis(array: np.ndarray, grid: fields.Grid) -> torch.Tensor:
    from inbrainsyn.synthesis import normalise_intensity

    image = grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.float32))))
    return fields.image_to_tensor(normalise_intensity(image))


def score(pair: Pair, displacement: torch.Tensor) -> dict:
    """EPE in the brain, carried regional volumes vs truth, tissue Dice, folding."""
    epe = synthetic.endpoint_error_mm(displacement, pair.true_displacement, pair.grid, pair.brain)
    det = fields.jacobian_determinant(displacement)
    out = {
        "epe_mean_mm": float(epe.mean()),
        "epe_p95_mm": float(torch.quantile(epe[:: max(1, epe.numel() // 1_000_000)], 0.95)),
        "folded_voxels": int((det <= 0).sum()),
        "min_jacobian": float(det.min()),
    }
    for name in pair.tissue_fixed:
        warped = fields.warp(pair.tissue_moving[name], displacement) > 0.5
        out[f"dice_{name}"] = synthetic.dice(warped, pair.tissue_fixed[name] > 0.5)
    voxel_ml = float(np.prod(pair.grid.spacing)) / 1000.0
    for region, m in pair.region_moving.items():
        carried = float(fields.warp(m, displacement).sum()) * voxel_ml
        out[f"{region}_ml"] = carried
        out[f"{region}_true_ml"] = pair.region_true_ml[region]
        out[f"{region}_template_ml"] = pair.region_moving_ml[region]
        out[f"{region}_rel_err"] = carried / pair.region_true_ml[region] - 1.0
    return out
