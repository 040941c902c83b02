"""Reproducible builder of the default HC/AD template bank (a MODEL, not learned from data).

Inputs (offline, build time only; the outputs are committed to ``Resources/bank/default``):

* MNI152 2009a symmetric T1 and GM/WM probability maps, as shipped in the nilearn wheel
  (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``);
* the AAL atlas and the brain it was drawn on (Colin27, ``ch2bet.nii.gz``) from Debian's
  ``mricron-data``; AAL is carried onto MNI152 2009a through a nonlinear registration of Colin27
  (:mod:`inbrainsyn.templates.atlas_labels`).

Base anatomy (age 55, the youngest age of the bank: the MNI152 2009a average was built from young
adults):

* brain = the skull-stripped T1's support (holes filled); the intracranial volume (ICV) adds a
  5 mm shell of extra-cerebral CSF around it (intensity 0, as CSF is dark on T1);
* tissue = argmax of (CSF = 1 - GM - WM, GM, WM) probabilities;
* lateral ventricles = the deep CSF component (over 6 mm from the brain's surface) found at the
  bodies/atria of the lateral ventricles (seed points in MNI RAS mm below), grown back by 2 voxels
  into CSF; temporal horns are too thin in the template to be separated and stay CSF;
* hippocampus / amygdala / subcortical GM = carried AAL labels on non-CSF tissue; the rest of the
  GM is cortex, split into the atrophy model's parcels by the nearest carried AAL cortical label
  (:data:`atlas_labels.CORTICAL_PARCELS`; cerebellar and other cortex stays ``cortical_gm``);
  cerebral WM = remaining WM (cerebellar and brainstem WM included), csf = remaining CSF + the shell.

Templates and ageing fields (all solved by :func:`atrophy.solve_ageing_svf`, which keeps the
intracranial volume and leaves everything outside it still):

* HC(a), a = 55, 65, ..., 95: the base anatomy aged in 10-year steps at the HC rates; the step
  SVFs are stored (``svfs`` and ``ageing_svfs`` of HC: for HC the template path is the ageing);
* AD(a): HC(a) deformed by the cross-sectional AD/HC ratios (a typical mild-to-moderate AD patient
  of age a); the AD template path between listed ages follows the HC steps (constant ratios);
* ``ageing_svfs`` of AD: AD(a) aged 10 years at the longitudinal AD rates (what one patient does).

* ``ageing_midpoints``: for every ageing piece, the ageing over its first 5 years solved on the same
  template, stored as its difference from half the piece (:func:`add_ageing_midpoints`); the loader
  interpolates pieces quadratically in time with it, so ages between listed ones meet the model;
* ``conversion_svfs``: HC(a) aged 10 years at the AD rates, stored as its difference from the AD piece
  (:func:`add_conversion_svfs`): what an HC -> AD converter does after the conversion.

Stored SVFs lie on a ~3 mm grid spanning the bank's box, as int16 (``scale`` mm per unit).
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
from inbrainsyn.templates import atlas_labels, atrophy
from inbrainsyn.templates.pace import PACE_BASIS, PACE_SIGMA_LOG
from inbrainsyn.templates.regions import DEFAULT_BANK_LABELS, argmax_labels, one_hot

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
AAL_HIPPOCAMPUS = atlas_labels.AAL_HIPPOCAMPUS
AAL_AMYGDALA = atlas_labels.AAL_AMYGDALA
AAL_SUBCORTICAL = atlas_labels.AAL_SUBCORTICAL
MRICRON = Path("/tmp/mricron/usr/share/mricron/templates")
VENTRICLE_SEEDS_RAS = ((8.0, -4.0, 20.0), (-8.0, -4.0, 20.0), (20.0, -35.0, 15.0), (-20.0, -35.0, 15.0))
SHELL_MM = 5.0  # extra-cerebral CSF around the MNI brain mask: the ageing fades to zero inside it
BOX_SHELL_MM = 2  # the box is cut around the brain dilated by this (6-connected voxels) + MARGIN_MM
MARGIN_MM = 4
LISTED_AGES = (55, 65, 75, 85, 95)  # templates every 10 years (size budget); SVFs between them
SVF_SPACING_MM = 3.0  # stored SVFs: a ~3 mm grid spanning the bank's box (the fields are smooth)
SVF_SCALE_MM = 0.002  # ...as int16, mm per stored unit (range +-65 mm)
SOLVE_SPACING_MM = 3.0  # the fields are smooth (3 mm source smoothing); full-grid rounds keep it accurate

DESCRIPTION = (
    "Default InBrainSyn template bank. THIS BANK IS A MODEL, NOT LEARNED FROM DATA: the anatomy is "
    "the MNI152 2009a symmetric average (treated as an HC brain of 55) with AAL regions carried from "
    "Colin27 by nonlinear registration; its ageing is a parametric regional atrophy model with annual "
    "rates from the literature (medial temporal fastest in AD; sensorimotor and occipital cortex "
    "relatively spared; ventricles and CSF grow inside a fixed skull; nothing moves outside it), "
    "realised as diffeomorphisms. The AD template at each age is a typical mild-to-moderate AD patient "
    "of that age (cross-sectional AD/HC ratios); one patient's AD ageing follows the longitudinal AD "
    "rates (ageing_svfs). Use it to run the tool; for research-grade ageing bring a bank learned from "
    "longitudinal data (docs/templates.md)."
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


def base_anatomy_1mm(mni_dir: Path, aal_path: Path, colin_path: Path | None = None,
                     log=print) -> tuple[sitk.Image, sitk.Image, dict]:
    """T1 in [0, 1] (float32) and label map (int16, :data:`DEFAULT_BANK_LABELS`) on the MNI 2009a 1 mm
    grid, cropped to the intracranial volume + margin, and the AAL label-quality measurements."""
    t1 = _read(mni_dir / MNI_FILES["t1"])
    arr_t1 = sitk.GetArrayFromImage(t1).astype(np.float32) / 255.0
    gm = sitk.GetArrayFromImage(_read(mni_dir / MNI_FILES["gm"])).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(_read(mni_dir / MNI_FILES["wm"])).astype(np.float32) / 255.0
    brain = ndi.binary_fill_holes(arr_t1 > 0)
    colin_path = Path(colin_path) if colin_path else Path(aal_path).parent / "ch2bet.nii.gz"
    mask_img = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask_img.CopyInformation(t1)
    start = time.time()
    carried = atlas_labels.aal_on_mni(t1, mask_img, _read(aal_path), _read(colin_path))
    quality = {kind: {k: round(v, 4) for k, v in atlas_labels.label_quality(getattr(carried, kind), gm, wm, brain).items()}
               for kind in ("identity", "affine", "nonlinear")}
    quality["registration"] = {"lncc": round(carried.similarity, 4), "min_jacobian": round(carried.min_jacobian, 4),
                               "seconds": round(time.time() - start, 1)}
    log(f"AAL carried from Colin27 to MNI152 2009a: {quality}")
    aal = sitk.GetArrayFromImage(carried.nonlinear)

    csf_p = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf_p, gm, wm]), axis=0)  # 0 CSF, 1 GM, 2 WM
    ball = ndi.generate_binary_structure(3, 1)
    icv = ndi.distance_transform_edt(~brain, sampling=tuple(reversed(t1.GetSpacing()))) <= SHELL_MM

    labels = np.zeros(arr_t1.shape, np.int16)
    names = {v: k for k, v in DEFAULT_BANK_LABELS.items()}
    labels[icv] = names["csf"]
    labels[brain & (tissue == 1)] = names["cortical_gm"]
    labels[brain & (tissue == 2)] = names["cerebral_wm"]
    is_tissue = brain & (tissue > 0)
    labels[is_tissue & np.isin(aal, AAL_SUBCORTICAL)] = names["subcortical_gm"]
    labels[is_tissue & np.isin(aal, AAL_HIPPOCAMPUS)] = names["hippocampus"]
    labels[is_tissue & np.isin(aal, AAL_AMYGDALA)] = names["amygdala"]
    cortex = labels == names["cortical_gm"]
    parcel = atlas_labels.nearest_cortical_parcel(aal, cortex, tuple(reversed(t1.GetSpacing())))
    for i, name in enumerate(atlas_labels.CORTICAL_PARCELS, start=1):
        labels[cortex & (parcel == i)] = names[name]

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
    # the bank's box: the brain + 2 mm + MARGIN_MM, as in banks before the 5 mm shell, so the grid
    # (which the shipped DaniNet weights are tied to) does not change; the shell may touch the faces,
    # where the ageing is held still anyway
    nz = np.argwhere(ndi.binary_dilation(brain, ball, iterations=BOX_SHELL_MM))
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
    return t1_img, lab_img, quality


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

    values = sorted(DEFAULT_BANK_LABELS)
    maps = torch.stack([fields.image_to_tensor(down(labels == v)) for v in values]).clamp(0, 1)
    return down(t1), maps, values


def coarse_svf_grid(grid: fields.Grid, spacing_mm: float = SVF_SPACING_MM) -> fields.Grid:
    """A grid of about ``spacing_mm`` spanning the same box as ``grid`` (same corner voxel centres)."""
    size = tuple(max(8, int(round((n - 1) * s / spacing_mm)) + 1) for n, s in zip(grid.size, grid.spacing))
    spacing = tuple(s * (n - 1) / (m - 1) for s, n, m in zip(grid.spacing, grid.size, size))
    return fields.Grid(size=size, spacing=spacing, origin=grid.origin, direction=grid.direction)


def write_compact_svf(velocity: torch.Tensor, grid: fields.Grid, path: Path) -> None:
    """Store an SVF (voxel units of ``grid``) on :func:`coarse_svf_grid` as int16 (``SVF_SCALE_MM`` mm/unit)."""
    from inbrainsyn import io

    coarse = coarse_svf_grid(grid)
    small = fields.resize_field(velocity, coarse.shape)
    mm = fields.field_to_physical(small, coarse) / SVF_SCALE_MM
    if np.abs(mm).max() >= 32767:
        raise InputError(f"{path.name}: SVF too large for int16 storage")
    image = coarse.apply_to(sitk.GetImageFromArray(np.rint(mm).astype(np.int16), isVector=True))
    io.write_image(image, path)


def solve(maps: torch.Tensor, names: list[str], goals: dict, spacing_zyx, model: atrophy.AtrophyModel, what: str,
          checks: dict, log=print) -> torch.Tensor:
    """One atrophy-model solve with its checks recorded; returns the SVF."""
    start = time.time()
    # solve on the hard labels the bank stores (what synthesis and the tests measure volumes on), not on
    # the partial-volume maps they come from: thin cortical parcels differ between the two by up to ~17 %
    values = sorted(DEFAULT_BANK_LABELS)[:maps.shape[0]]
    maps = one_hot(argmax_labels(maps, values), values)
    # 12 x 4 iterations: thin cortical parcels next to faster neighbours (e.g. sensorimotor between
    # frontal and parietal cortex in AD) need more than the solver's default 8 x 3 to get within a few %
    sol = atrophy.solve_ageing_svf(maps, names, goals, spacing_zyx, balance_region=model.balance_region,
                                   solve_spacing_mm=SOLVE_SPACING_MM, iterations=12, full_rounds=4)
    errors = sol.relative_errors()
    worst = sorted(errors, key=errors.get)[-3:]
    log(f"  {what}: {sol.iterations} it, {time.time() - start:.1f}s, min det {sol.min_jacobian:.2f}, worst "
        + ", ".join(f"{n} {sol.achieved[n]:+.3f}/{sol.goals[n]:+.3f}" for n in worst))
    checks[what] = {"min_jacobian": round(sol.min_jacobian, 3),
                    **{n: {"goal": round(sol.goals[n], 4), "achieved": round(sol.achieved[n], 4)} for n in sol.goals}}
    return sol.velocity


def build_default_bank(out_dir: Path, mni_dir: Path | None = None, aal_path: Path | None = None,
                       spacing: float = 1.5, listed_ages=LISTED_AGES, colin_path: Path | None = None,
                       log=print) -> Path:
    """Build the default bank into ``out_dir`` (written atomically by the caller's staging)."""
    from inbrainsyn import io

    mni_dir = Path(mni_dir) if mni_dir else find_mni_dir()
    aal_path = Path(aal_path) if aal_path else MRICRON / "aal.nii.gz"
    start = time.time()
    t1_1mm, labels_1mm, quality = base_anatomy_1mm(mni_dir, aal_path, colin_path, log=log)
    t1_img, maps, values = resample_to_spacing(t1_1mm, labels_1mm, spacing)
    grid = fields.Grid.from_sitk(t1_img)
    names = [DEFAULT_BANK_LABELS[v] for v in values]
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

    def save_svf(u: torch.Tensor, name: str) -> str:
        write_compact_svf(u, grid, out_dir / name)
        return name

    base_labels = save_labels(maps, "labels.nii.gz")
    mask = (argmax_labels(maps, values) > 0).to(torch.uint8)
    io.write_image(fields.tensor_to_image(mask, grid, sitk.sitkUInt8), out_dir / "mask.nii.gz")
    checks: dict[str, dict] = {}
    cohorts: dict[str, list] = {"HC": [], "AD": []}
    svfs: list[dict] = []
    ageing: list[dict] = []
    ages = [float(a) for a in listed_ages]
    hc_total = torch.zeros((3, *t1.shape))
    for i, age in enumerate(ages):
        hc_maps = fields.warp(maps, hc_total) if i else maps
        stem = f"{age:03.0f}"
        cohorts["HC"].append({"age": age, "image": save_uint8(fields.warp(t1, hc_total) if i else t1, f"HC_{stem}.nii.gz"),
                              "labels": save_labels(hc_maps, f"HC_{stem}_labels.nii.gz")})
        # AD(a): a typical mild-to-moderate AD patient of this age = HC(a) with the cross-sectional ratios
        d = solve(hc_maps, names, model.cross_sectional_ad(), spacing_zyx, model, f"AD/HC cross-section at {age:g}", checks, log)
        ad_total = fields.compose(hc_total, fields.exp(d))
        ad_maps = fields.warp(maps, ad_total)
        cohorts["AD"].append({"age": age, "image": save_uint8(fields.warp(t1, ad_total), f"AD_{stem}.nii.gz"),
                              "labels": save_labels(ad_maps, f"AD_{stem}_labels.nii.gz")})
        if i + 1 == len(ages):
            break
        nxt = ages[i + 1]
        tag = f"{age:03.0f}_{nxt:03.0f}"
        u_hc = solve(hc_maps, names, model.targets("HC", age, nxt), spacing_zyx, model, f"HC {age:g}->{nxt:g}", checks, log)
        hc_file = save_svf(u_hc, f"svf_HC_{tag}.nii.gz")
        u_ad = solve(ad_maps, names, model.targets("AD", age, nxt), spacing_zyx, model, f"AD {age:g}->{nxt:g}", checks, log)
        ad_file = save_svf(u_ad, f"ageing_AD_{tag}.nii.gz")
        piece = {"age_from": age, "age_to": nxt, "scale": SVF_SCALE_MM}
        svfs += [{"cohort": "HC", **piece, "file": hc_file}, {"cohort": "AD", **piece, "file": hc_file}]
        ageing += [{"cohort": "HC", **piece, "file": hc_file}, {"cohort": "AD", **piece, "file": ad_file}]
        hc_total = fields.compose(hc_total, fields.exp(u_hc))

    bank = {
        "format": "inbrainsyn-bank-v1",
        "name": "InBrainSyn default model bank (MNI152 2009a + regional literature atrophy model)",
        "description": DESCRIPTION,
        "provenance": {
            "anatomy": "MNI152 2009a symmetric T1, GM, WM (ICBM, McConnell Brain Imaging Centre), from the nilearn wheel",
            "regions": "AAL (Tzourio-Mazoyer 2002) from Debian mricron-data, carried from the brain it was drawn on "
                       "(Colin27, ch2bet) onto MNI152 2009a by affine + SVF registration (inbrainsyn.registration, "
                       "default parameters); hippocampus 37/38, amygdala 41/42, caudate/putamen/pallidum/thalamus "
                       "71-78, cortical parcels (inbrainsyn.templates.atlas_labels); ventricles and CSF from the "
                       "MNI tissue maps",
            "aal_label_quality": quality,
            "ageing": "parametric regional atrophy model (inbrainsyn.templates.atrophy), see atrophy_model and docs/templates.md",
            "templates": "HC: base anatomy aged at the HC rates; AD(a) = HC(a) deformed by the cross-sectional AD/HC "
                         "ratios (typical mild-to-moderate AD at age a); AD template path between listed ages follows "
                         "the HC steps (constant ratios)",
            "ageing_svfs": "HC: the HC steps; AD: AD(a) aged at the longitudinal AD rates (one patient's ageing)",
            "builder": "inbrainsyn bank build (inbrainsyn.templates.default_bank.build_default_bank)",
            "base_age": model.base_age,
            "spacing_mm": spacing,
            "svf_grid": {"size": list(coarse_svf_grid(grid).size), "scale_mm": SVF_SCALE_MM},
            "build_seconds": round(time.time() - start, 1),
        },
        "licence": "MNI152 2009a: free use with the copyright notice of the McConnell Brain Imaging Centre "
                   "(Copyright (C) 1993-2009 Louis Collins, MNI, McGill University); AAL: free for research; "
                   "the derived bank is distributed under the same terms.",
        "learned_from_data": False,
        "intensity_scale": 1.0 / 255.0,
        "mask": "mask.nii.gz",
        "labels": base_labels,
        "label_names": {str(v): DEFAULT_BANK_LABELS[v] for v in values},
        "cohorts": cohorts,
        "svfs": svfs,
        "ageing_svfs": ageing,
        "pace": {"sigma_log": PACE_SIGMA_LOG, "basis": PACE_BASIS},
        "atrophy_model": model.to_json(),
        "build_checks_log_volume_change": checks,
    }
    io.write_json(bank, out_dir / "bank.json")
    add_ageing_midpoints(out_dir, log=log)
    add_conversion_svfs(out_dir, log=log)
    log(f"bank written to {out_dir} in {time.time() - start:.1f}s")
    return out_dir


def _add_solved_pieces(bank_dir: Path, key: str, provenance: str, solve_piece, log=print) -> Path:
    """Add one list of solved fields to a built bank: for every stored ageing piece (cohort, a0, a1),
    ``solve_piece(bank, cohort, a0, a1, stored, solve_on)`` returns ``(field, file name, entry)`` or
    None (skip); the field is written beside bank.json and the entries are stored under ``key``.

    ``solve_on(cohort, a0, targets, what)`` solves the atrophy model for ``targets`` on the listed
    template (cohort, a0)'s own labels, as :func:`build_default_bank` does, logging its build check.
    Templates, labels, mask and the stored pieces are not touched.
    """
    from inbrainsyn import io
    from inbrainsyn.templates.bank import load_bank

    bank_dir = Path(bank_dir)
    bank = load_bank(bank_dir)
    if bank.model is None or not bank._ageing_files:
        raise InputError(f"{bank_dir}: {key} need an atrophy_model and stored ageing_svfs")
    values = sorted(bank.label_names)
    names = [bank.label_names[v] for v in values]
    data = json.loads((bank_dir / "bank.json").read_text(encoding="utf-8"))
    checks = data.setdefault("build_checks_log_volume_change", {})

    def solve_on(cohort: str, a0: float, targets, what: str):
        entry = next(e for e in bank.entries[cohort] if abs(e.age - a0) < 1e-6)
        maps = one_hot(bank._listed_labels(entry).long(), values)
        return solve(maps, names, targets, bank.spacing_zyx, bank.model, what, checks, log)

    entries = []
    for (cohort, a0, a1), stored in sorted(bank._ageing_files.items()):
        piece = solve_piece(bank, cohort, a0, a1, stored, solve_on)
        if piece is None:
            continue
        field, name, entry = piece
        write_compact_svf(field, bank.grid, bank_dir / name)
        entries.append({**entry, "scale": SVF_SCALE_MM, "file": name})
    data[key] = entries
    data.setdefault("provenance", {})[key] = provenance
    io.write_json(data, bank_dir / "bank.json")
    return bank_dir


def add_ageing_midpoints(bank_dir: Path, log=print) -> Path:
    """Solve the first half of every stored ageing piece and add ``ageing_midpoints`` to ``bank_dir``.

    For the piece ``u`` (a0 -> a1, from ``template(a0)``) the atrophy model is solved for a0 -> (a0 + a1) / 2
    on the same anatomy (the listed template's stored labels: the one-hot maps :func:`solve` uses in
    :func:`build_default_bank`), and ``d = u_half - u / 2`` is stored (small: ~0.1 MB per piece).
    Templates, labels, mask and the stored pieces are not touched; bank.json gains ``ageing_midpoints``
    and their build checks.
    """
    def midpoint(bank, cohort, a0, a1, stored, solve_on):
        half = 0.5 * (a0 + a1)
        u_half = solve_on(cohort, a0, bank.model.targets(cohort, a0, half), f"{cohort} {a0:g}->{half:g}")
        return (u_half - 0.5 * bank._stored(stored), f"ageing_mid_{cohort}_{a0:03.0f}_{a1:03.0f}.nii.gz",
                {"cohort": cohort, "age_from": a0, "age_to": a1})

    return _add_solved_pieces(
        bank_dir, "ageing_midpoints",
        "per ageing piece: the model solved over its first half on the same template, stored as its difference "
        "from half the piece; the loader interpolates each piece quadratically in time (docs/templates.md section 7)",
        midpoint, log)


def add_conversion_svfs(bank_dir: Path, log=print) -> Path:
    """Solve HC(a0) aged at the AD rates over every AD ageing piece and add ``conversion_svfs`` to ``bank_dir``.

    Stored as ``c = u_conv - u_AD`` (small where the HC and AD templates agree: ~0.2 MB per piece); the
    loader ages an HC -> AD converter along ``u_AD + c`` after the conversion age.  Templates, labels, mask
    and the other stored fields are not touched.
    """
    def conversion(bank, cohort, a0, a1, stored, solve_on):
        if cohort != "AD":
            return None
        u_conv = solve_on("HC", a0, bank.model.targets("AD", a0, a1), f"HC template at {a0:g} aged at AD rates to {a1:g}")
        return (u_conv - bank._stored(stored), f"conversion_{a0:03.0f}_{a1:03.0f}.nii.gz",
                {"cohort": "AD", "age_from": a0, "age_to": a1})

    return _add_solved_pieces(
        bank_dir, "conversion_svfs",
        "per AD ageing piece: the HC template at its start aged at the AD rates (an HC -> AD converter), stored "
        "as its difference from the AD piece (docs/templates.md section 7)",
        conversion, log)
