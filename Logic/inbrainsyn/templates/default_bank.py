"""Reproducible builder of the default HC/AD template bank (a MODEL, not learned from data).

Inputs (offline, build time only; the outputs are committed to ``Resources/bank/default``):

* MNI152 2009a symmetric T1 and GM/WM probability maps, as shipped in the nilearn wheel
  (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``);
* the AAL atlas from Debian's ``mricron-data`` (``templates/aal.nii.gz``) for hippocampus (AAL 37/38),
  amygdala (41/42) and deep grey nuclei (caudate, putamen, pallidum, thalamus: 71-78).

Base anatomy (age 55, shared by both cohorts -- a documented choice: the MNI152 2009a average
was built from young adults, so it stands for the youngest age of the bank):

* brain = the skull-stripped T1's support (holes filled); the intracranial volume (ICV) adds a
  2 mm shell of extra-cerebral CSF around it (intensity 0, as CSF is dark on T1);
* tissue = argmax of (CSF = 1 - GM - WM, GM, WM) probabilities;
* lateral ventricles = the deep CSF component (over 6 mm from the brain's surface) found at the
  bodies/atria of the lateral ventricles (seed points in MNI RAS mm below), grown back by 2 voxels
  into CSF; temporal horns are too thin in the template to be separated and stay CSF;
* hippocampus / amygdala / subcortical GM = AAL labels on non-CSF tissue (AAL resampled to the
  2009a grid by nearest neighbour; both are in MNI space);
* cortical GM = remaining GM (cerebellar cortex included), cerebral WM = remaining WM
  (cerebellar and brainstem WM included), csf = remaining CSF + the shell.

Ageing: for each cohort the anatomy is aged in 5-year steps by :func:`atrophy.solve_ageing_svf`
on the current (warped) partial-volume maps; deformations are composed and the base T1 and maps
are warped once per age (no repeated interpolation).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.errors import InputError
from inbrainsyn.templates import atrophy
from inbrainsyn.templates.regions import CANONICAL_LABELS, argmax_labels

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
AAL_HIPPOCAMPUS = (37, 38)
AAL_AMYGDALA = (41, 42)
AAL_SUBCORTICAL = (71, 72, 73, 74, 75, 76, 77, 78)
VENTRICLE_SEEDS_RAS = ((8.0, -4.0, 20.0), (-8.0, -4.0, 20.0), (20.0, -35.0, 15.0), (-20.0, -35.0, 15.0))
SHELL_MM = 2
MARGIN_MM = 4
STEP_AGES = tuple(range(55, 96, 5))  # ageing is solved in 5-year steps
LISTED_AGES = (55, 65, 75, 85, 95)  # ...and stored every 10 years (size budget); the model interpolates

DESCRIPTION = (
    "Default InBrainSyn template bank. THIS BANK IS A MODEL, NOT LEARNED FROM DATA: the anatomy is "
    "the MNI152 2009a symmetric average (treated as age 55 for both cohorts) and its ageing is a "
    "parametric regional atrophy model with annual rates from the literature (hippocampus, amygdala, "
    "cortical and subcortical GM, WM shrink; lateral ventricles and CSF grow inside a fixed skull), "
    "faster for AD than for healthy ageing (HC), realised as diffeomorphisms. Use it to run the "
    "tool; for research-grade ageing bring a bank learned from longitudinal data (docs/templates.md)."
)


def find_mni_dir() -> Path:
    """Folder of the MNI152 2009a maps inside the installed nilearn package (not imported: slow)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("nilearn is not installed; pip install nilearn (only needed to build the default bank)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _read(path: Path) -> sitk.Image:
    if not Path(path).exists():
        raise InputError(f"{path}: missing input of the default-bank builder")
    return sitk.ReadImage(str(path))


def _ras_to_index(image: sitk.Image, ras: tuple[float, float, float]) -> tuple[int, int, int]:
    """MNI RAS mm -> (k, j, i) array index of ``image`` (ITK physical space is LPS)."""
    i, j, k = image.TransformPhysicalPointToIndex((-ras[0], -ras[1], ras[2]))
    return k, j, i


def base_anatomy_1mm(mni_dir: Path, aal_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """T1 in [0, 1] (float32) and canonical label map (int16) on the MNI 2009a 1 mm grid, cropped
    to the intracranial volume + margin."""
    t1 = _read(mni_dir / MNI_FILES["t1"])
    arr_t1 = sitk.GetArrayFromImage(t1).astype(np.float32) / 255.0
    gm = sitk.GetArrayFromImage(_read(mni_dir / MNI_FILES["gm"])).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(_read(mni_dir / MNI_FILES["wm"])).astype(np.float32) / 255.0
    aal = sitk.GetArrayFromImage(
        sitk.Resample(_read(aal_path), t1, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )

    brain = ndi.binary_fill_holes(arr_t1 > 0)
    csf_p = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf_p, gm, wm]), axis=0)  # 0 CSF, 1 GM, 2 WM
    ball = ndi.generate_binary_structure(3, 1)
    icv = ndi.binary_dilation(brain, ball, iterations=SHELL_MM)

    labels = np.zeros(arr_t1.shape, np.int16)
    names = {v: k for k, v in CANONICAL_LABELS.items()}
    labels[icv] = names["csf"]
    labels[brain & (tissue == 1)] = names["cortical_gm"]
    labels[brain & (tissue == 2)] = names["cerebral_wm"]
    is_tissue = brain & (tissue > 0)
    labels[is_tissue & np.isin(aal, AAL_SUBCORTICAL)] = names["subcortical_gm"]
    labels[is_tissue & np.isin(aal, AAL_HIPPOCAMPUS)] = names["hippocampus"]
    labels[is_tissue & np.isin(aal, AAL_AMYGDALA)] = names["amygdala"]

    # lateral ventricles: deep CSF component at the seeds, grown back to the CSF boundary
    csf = brain & (tissue == 0)
    depth = ndi.distance_transform_edt(brain)
    components, _ = ndi.label(csf & (depth > 6))
    chosen = set()
    for ras in VENTRICLE_SEEDS_RAS:
        k, j, i = _ras_to_index(t1, ras)
        patch = components[k - 5:k + 6, j - 5:j + 6, i - 5:i + 6]
        values, counts = np.unique(patch[patch > 0], return_counts=True)
        if values.size:
            chosen.add(int(values[np.argmax(counts)]))
    if not chosen:
        raise InputError("default bank: no lateral-ventricle component found at the seed points")
    seeded = np.isin(components, sorted(chosen))
    # grow back to the CSF boundary, but not into other deep CSF (interhemispheric fissure, 3rd ventricle)
    other = (components > 0) & ~seeded
    ventricles = (seeded | (ndi.binary_dilation(seeded, ball, iterations=2) & csf)) & ~other
    labels[ventricles] = names["lateral_ventricles"]

    # crop to the ICV bounding box + margin
    nz = np.argwhere(icv)
    lo = np.maximum(nz.min(0) - MARGIN_MM, 0)
    hi = np.minimum(nz.max(0) + MARGIN_MM + 1, np.array(icv.shape))
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    t1_img = sitk.GetImageFromArray(np.where(icv, arr_t1, 0.0)[crop].astype(np.float32))
    lab_img = sitk.GetImageFromArray(labels[crop])
    origin = t1.TransformIndexToPhysicalPoint([int(lo[2]), int(lo[1]), int(lo[0])])
    for img in (t1_img, lab_img):
        img.SetSpacing(t1.GetSpacing())
        img.SetDirection(t1.GetDirection())
        img.SetOrigin(origin)
    return t1_img, lab_img


def resample_to_spacing(t1: sitk.Image, labels: sitk.Image, spacing: float) -> tuple[sitk.Image, torch.Tensor, list[int]]:
    """T1 (linear, anti-aliased) and partial-volume maps ``(R, Z, Y, X)`` on an isotropic grid of
    ``spacing`` mm covering the same extent; returns (t1, maps, label values in map order)."""
    old_size = np.array(t1.GetSize())
    new_size = [int(math.floor((n - 1) * s / spacing)) + 1 for n, s in zip(old_size, t1.GetSpacing())]
    reference = sitk.Image(new_size, sitk.sitkFloat32)
    reference.SetSpacing((spacing,) * 3)
    reference.SetOrigin(t1.GetOrigin())
    reference.SetDirection(t1.GetDirection())
    sigma = max(0.0, 0.5 * (spacing - t1.GetSpacing()[0]))

    def down(img: sitk.Image) -> sitk.Image:
        img = sitk.Cast(img, sitk.sitkFloat32)
        if sigma > 0:
            img = sitk.SmoothingRecursiveGaussian(img, sigma)
        return sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    values = sorted(CANONICAL_LABELS)
    maps = torch.stack([fields.image_to_tensor(down(labels == v)) for v in values]).clamp(0, 1)
    return down(t1), maps, values


def age_cohort(t1: torch.Tensor, maps: torch.Tensor, names: list[str], spacing_zyx, model: atrophy.AtrophyModel,
               cohort: str, ages: list[float], log=print) -> list[tuple[float, torch.Tensor, torch.Tensor, dict]]:
    """Age the base anatomy along ``ages`` (ages[0] = base).  Returns per age (age, T1, maps, info)."""
    out = [(float(ages[0]), t1, maps, {"achieved": {}, "goals": {}})]
    total = torch.zeros((3, *t1.shape))
    for a0, a1 in zip(ages[:-1], ages[1:]):
        current = fields.warp(maps, total) if total.abs().max() > 0 else maps
        start = time.time()
        sol = atrophy.solve_ageing_svf(current, names, model.targets(cohort, a0, a1), spacing_zyx,
                                       balance_region=model.balance_region)
        step = fields.exp(sol.velocity)
        total = fields.compose(total, step)
        errors = sol.relative_errors()
        log(f"  {cohort} {a0:.0f}->{a1:.0f}: {sol.iterations} it, {time.time() - start:.1f}s, min det {sol.min_jacobian:.2f}, "
            f"max rel err {max(errors.values()):.3f}")
        out.append((float(a1), fields.warp(t1, total), fields.warp(maps, total),
                    {"goals": sol.goals, "achieved": sol.achieved}))
    return out


def build_default_bank(out_dir: Path, mni_dir: Path | None = None, aal_path: Path | None = None,
                       spacing: float = 1.5, step_ages=STEP_AGES, listed_ages=LISTED_AGES,
                       log=print) -> Path:
    """Build the default bank into ``out_dir`` (written atomically by the caller's staging)."""
    from inbrainsyn import io

    mni_dir = Path(mni_dir) if mni_dir else find_mni_dir()
    aal_path = Path(aal_path) if aal_path else Path("/tmp/mricron/usr/share/mricron/templates/aal.nii.gz")
    start = time.time()
    t1_1mm, labels_1mm = base_anatomy_1mm(mni_dir, aal_path)
    t1_img, maps, values = resample_to_spacing(t1_1mm, labels_1mm, spacing)
    grid = fields.Grid.from_sitk(t1_img)
    names = [CANONICAL_LABELS[v] for v in values]
    spacing_zyx = tuple(reversed(grid.spacing))
    t1 = fields.image_to_tensor(t1_img)
    model = atrophy.AtrophyModel()
    log(f"base anatomy on {grid.size} at {spacing} mm ({time.time() - start:.1f}s)")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save_uint8(tensor: torch.Tensor, name: str) -> str:
        scaled = torch.round(tensor.clamp(0, 1) * 255.0)
        io.write_image(fields.tensor_to_image(scaled, grid, sitk.sitkUInt8), out_dir / name)
        return name

    def save_labels(m: torch.Tensor, name: str) -> str:
        io.write_image(fields.tensor_to_image(argmax_labels(m, values), grid, sitk.sitkUInt8), out_dir / name)
        return name

    base_labels = save_labels(maps, "labels.nii.gz")
    mask = (argmax_labels(maps, values) > 0).to(torch.uint8)
    io.write_image(fields.tensor_to_image(mask, grid, sitk.sitkUInt8), out_dir / "mask.nii.gz")
    cohorts: dict[str, list] = {}
    checks: dict[str, dict] = {}
    for cohort in atrophy.COHORTS:
        entries = []
        for age, image, aged_maps, info in age_cohort(t1, maps, names, spacing_zyx, model, cohort, list(step_ages), log):
            if info["goals"]:
                checks[f"{cohort} {age - (step_ages[1] - step_ages[0]):g}->{age:g}"] = {
                    n: {"goal": round(info["goals"][n], 4), "achieved": round(info["achieved"][n], 4)}
                    for n in info["goals"]
                }
            if not any(abs(age - a) < 1e-6 for a in listed_ages):
                continue
            if cohort != "HC" and abs(age - model.base_age) < 1e-6 and "HC" in cohorts:
                entries.append(dict(cohorts["HC"][0]))  # both cohorts share the base anatomy: same files
                continue
            stem = f"{cohort}_{age:03.0f}"
            entries.append({
                "age": age,
                "image": save_uint8(image, f"{stem}.nii.gz"),
                "labels": save_labels(aged_maps, f"{stem}_labels.nii.gz"),
            })
        cohorts[cohort] = entries

    bank = {
        "format": "inbrainsyn-bank-v1",
        "name": "InBrainSyn default model bank (MNI152 2009a + literature atrophy model)",
        "description": DESCRIPTION,
        "provenance": {
            "anatomy": "MNI152 2009a symmetric T1, GM, WM (ICBM, McConnell Brain Imaging Centre), from the nilearn wheel",
            "regions": "AAL (Tzourio-Mazoyer 2002) from Debian mricron-data: hippocampus 37/38, amygdala 41/42, "
                       "caudate/putamen/pallidum/thalamus 71-78; ventricles and CSF from the MNI tissue maps",
            "ageing": "parametric atrophy model (inbrainsyn.templates.atrophy), see atrophy_model and docs/templates.md",
            "builder": "inbrainsyn bank build (inbrainsyn.templates.default_bank.build_default_bank)",
            "base_age": model.base_age,
            "spacing_mm": spacing,
            "build_seconds": round(time.time() - start, 1),
        },
        "licence": "MNI152 2009a: free use with the copyright notice of the McConnell Brain Imaging Centre "
                   "(Copyright (C) 1993-2009 Louis Collins, MNI, McGill University); AAL: free for research; "
                   "the derived bank is distributed under the same terms.",
        "learned_from_data": False,
        "intensity_scale": 1.0 / 255.0,
        "mask": "mask.nii.gz",
        "labels": base_labels,
        "label_names": {str(v): CANONICAL_LABELS[v] for v in values},
        "cohorts": cohorts,
        "atrophy_model": model.to_json(),
        "build_checks_log_volume_change": checks,
    }
    io.write_json(bank, out_dir / "bank.json")
    log(f"bank written to {out_dir} in {time.time() - start:.1f}s")
    return out_dir
