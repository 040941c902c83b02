"""Ground-truth ageing phantom: a synthetic longitudinal cohort whose anatomy varies as older adults' does.

Each subject is built as follows (all deterministic for a seed; Colin27 is never used):

1. **Anatomy.**  The bank template (and its labels) of the subject's starting cohort at the listed age
   nearest to the baseline age, resampled onto a grid padded by ``pad_mm`` (room for a skull and a
   larger head), then
   a. **regional volumes** drawn per subject -- lateral ventricles 0.6-3x and hippocampi 0.5-1.1x the
      template's (log-uniform), amygdalae following the hippocampi, cortical/subcortical GM and WM by a
      common *brain factor* (so the brain-to-intracranial ratio varies) -- realised by the atrophy
      solver :func:`atrophy.solve_ageing_svf` on the template's own partial-volume maps (``exp(s)``;
      CSF balances inside a fixed skull), so the subject's labels stay known exactly;
   b. a random diffeomorphism ``psi = A o exp(r_L) o exp(r_D)``: ``r_L`` a large smooth SVF (largest
      displacement 10-15 mm, smoothness 40 mm), ``r_D`` a less smooth one (about 8 mm at 15 mm) and
      ``A`` an affine whose isotropic scale sets the intracranial volume (ICV x 0.9-1.1) with a
      small anisotropy (+-3 %), rotation (+-6 degrees) and shift (+-5 mm).
   The subject is ``template o phi`` with ``phi = exp(s) o psi``; partial-volume label maps are warped
   the same way (trilinear).
2. **Group.**  HC, AD, or HC->AD converter (round robin), a baseline age and, for converters, a
   conversion age between the baseline and the last follow-up.
3. **Two truths** for each follow-up at baseline + ``followup_years`` (see docs/evaluation.md):
   * ``subject`` -- the atrophy model's regional log-volume changes (HC / AD / converter rates, times
     subject-specific lognormal multipliers, sigma 0.2) solved on the subject's own partial-volume
     maps.  Since the subject's regions are the template's regions carried by ``phi``, this is the
     template's kind of ageing seen in the subject's coordinates: the change-of-coordinates view
     behind full conjugation, which it favours.
   * ``pattern`` -- the same regional targets, but each tissue region is split by a smooth random
     field (40 mm) into two parts whose rates differ by a subject-specific factor ``exp(+-d)``
     (``d`` 0.3-0.7): a spatial pattern of atrophy that the template's ageing does not contain, so
     no transport of the template's ageing can recover it.
   The true baseline -> follow-up map ``exp(u)`` of each truth is written (ITK displacement field).
4. **Acquisition** (the demo subject's model): a synthetic skull and scalp around the intracranial
   volume, per subject an intensity scale, contrast gamma and smooth multiplicative bias field;
   per scan a small extra bias variation and Rician noise.  Images are int16.  Every scan is written
   with skull (``head``) and skull-stripped (``T1w``); ``clean`` images (brain only) omit the per-scan
   bias variation and the noise and are the reference for image metrics.  Every third block of three
   subjects (one per group) is marked ``input = head``: the evaluation runs those through the whole
   pipeline as a user would (affine and brain extraction on the scan with skull).

Outputs in ``DIR``: ``cohort.csv`` (subject, scan, age, group, transition_age, path, labels_path,
mask_path, clean_path, head_path, input; paths relative to DIR), ``truths.csv`` (subject, scan, age,
truth, clean_path, labels_path, mask_path, field_path; one row per follow-up and truth),
``phantom.json`` (parameters; per subject the anatomical draws, the measured anatomy -- volumes, ICV,
brain-to-ICV ratio, displacement from the template -- and per scan and truth the prescribed and
achieved regional log-volume changes and the summary-region volumes ``volumes_ml`` measured on the
warped partial-volume maps) and per subject ``sub-XXX/`` images, label maps, masks and fields.  The
``cohort.csv`` follow-ups are the ``subject`` truth.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from inbrainsyn import fields, io
from inbrainsyn.errors import InputError, ProcessingError
from inbrainsyn.templates import atrophy
from inbrainsyn.templates.bank import Bank, load_bank
from inbrainsyn.templates.regions import CORTICAL_PARCEL_LABELS, argmax_labels, one_hot, summary_volumes_from_maps

GROUPS = ("HC", "AD", "HC->AD")
TRUTHS = ("subject", "pattern")
BASELINE_AGE_RANGES = {"HC": (60.0, 82.0), "AD": (65.0, 82.0), "HC->AD": (62.0, 80.0)}
RATE_SIGMA = 0.2
COHORT_COLUMNS = ("subject", "scan", "age", "group", "transition_age", "path", "labels_path", "mask_path",
                  "clean_path", "head_path", "input")
TRUTH_COLUMNS = ("subject", "scan", "age", "truth", "clean_path", "labels_path", "mask_path", "field_path")
TISSUE_REGIONS = ("hippocampus", "amygdala", "cortical_gm", "subcortical_gm", "cerebral_wm",
                  *CORTICAL_PARCEL_LABELS.values())  # a bank's cortical parcels are cortex too


@dataclass
class PhantomConfig:
    subjects: int = 30
    seed: int = 0
    first_index: int = 0  # subjects are sub-<first_index> ... (to build a cohort in chunks)
    spacing: float | None = None  # mm; None = the bank's spacing
    followup_years: tuple[float, ...] = (2.0, 4.0, 6.0)
    # anatomy (factors of the anatomy template's volumes; ventricles/hippocampi log-uniform)
    ventricle_factor: tuple[float, float] = (0.6, 3.0)
    hippocampus_factor: tuple[float, float] = (0.5, 1.1)
    icv_factor: tuple[float, float] = (0.9, 1.1)
    brain_factor: tuple[float, float] = (0.88, 1.04)
    max_displacement_mm: tuple[float, float] = (10.0, 15.0)  # large smooth warp
    smoothness_mm: float = 40.0
    detail_displacement_mm: tuple[float, float] = (7.0, 9.0)  # less smooth warp
    detail_smoothness_mm: float = 15.0
    pad_mm: float = 16.0  # grid padding around the bank grid (skull, scalp, larger heads)
    # acquisition
    noise: tuple[float, float] = (0.015, 0.035)  # Rician sigma as a fraction of the WM intensity
    bias_amplitude: float = 0.15
    pipeline_every: int = 3  # subjects 3k*N..3k*N+2 (one per group) are evaluated with skull; 0 = none
    # truths
    truths: tuple[str, ...] = TRUTHS
    pattern_contrast: tuple[float, float] = (0.3, 0.7)
    pattern_smoothness_mm: float = 40.0
    solve_spacing_mm: float = 3.0
    solver_rounds: int = 2  # full-grid defect corrections of the atrophy solver (the truth is the field, not the goal)
    workers: int = 1  # subjects built in parallel processes

    def validate(self) -> None:
        if self.subjects < 1:
            raise InputError(f"--subjects must be at least 1, got {self.subjects}")
        if not self.followup_years or any(y <= 0 for y in self.followup_years):
            raise InputError(f"follow-up intervals must be positive years, got {self.followup_years}")
        if self.spacing is not None and not 0.5 <= self.spacing <= 4.0:
            raise InputError(f"--spacing must be between 0.5 and 4 mm, got {self.spacing}")
        if not self.truths or any(t not in TRUTHS for t in self.truths) or self.truths[0] != "subject":
            raise InputError(f"truths must start with 'subject' and be among {', '.join(TRUTHS)}, got {self.truths}")
        if self.first_index < 0:
            raise InputError(f"--first-index must be >= 0, got {self.first_index}")
        if self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")


def config_from_json(values: dict) -> PhantomConfig:
    """The :class:`PhantomConfig` recorded in a phantom's ``phantom.json`` (``config``); unknown keys ignored."""
    known = PhantomConfig.__dataclass_fields__
    return PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Random fields
# ---------------------------------------------------------------------------------------------


def smooth_noise(shape: tuple[int, int, int], spacing_zyx, smoothness_mm: float, rng: np.random.Generator,
                 channels: int = 1) -> np.ndarray:
    """Zero-mean smooth random field ``(channels, Z, Y, X)`` with unit largest magnitude.

    White noise on a coarse grid (spacing = smoothness/2) is Gaussian-filtered and upsampled, which
    is cheap and smooth at scale ``smoothness_mm``.
    """
    coarse = tuple(max(4, int(math.ceil(n * s / (smoothness_mm / 2.0))) + 1) for n, s in zip(shape, spacing_zyx))
    noise = rng.standard_normal((channels, *coarse))
    noise = np.stack([ndi.gaussian_filter(c, 1.0, mode="wrap") for c in noise])
    up = F.interpolate(torch.from_numpy(noise).unsqueeze(0), size=shape, mode="trilinear", align_corners=True)[0]
    up = up - up.mean(dim=(1, 2, 3), keepdim=True)
    norm = torch.sqrt((up ** 2).sum(0)).max() if channels > 1 else up.abs().max()
    return (up / norm).numpy()


def random_affine_displacement(shape, spacing_zyx, rng: np.random.Generator, scale: float = 1.0,
                               anisotropy: float = 0.05, degrees: float = 4.0, shift_mm: float = 3.0) -> torch.Tensor:
    """Displacement ``(3, Z, Y, X)`` (voxel units) of a random affine about the volume centre.

    Pull-back: the image warped by it is the anatomy scaled by ``1 / scale`` (``scale`` < 1 enlarges
    the head), times a random per-axis factor ``1 +- anisotropy``, rotated by up to ``degrees`` about
    each axis and shifted by up to ``shift_mm``.
    """
    angles = np.deg2rad(rng.uniform(-degrees, degrees, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix = rz @ ry @ rx @ np.diag(scale * rng.uniform(1 - anisotropy, 1 + anisotropy, 3))
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    spacing_xyz = np.array(spacing_zyx[::-1])
    points = fields.voxel_coordinates(shape, dtype=torch.float64).numpy().reshape(3, -1) * spacing_xyz[:, None]
    centre = points.mean(1, keepdims=True)
    moved = matrix @ (points - centre) + centre + shift[:, None]
    disp = (moved - points) / spacing_xyz[:, None]
    return torch.from_numpy(disp.reshape(3, *shape)).float()


# ---------------------------------------------------------------------------------------------
# Acquisition model
# ---------------------------------------------------------------------------------------------


def synthetic_skull(icv: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Intensity (0-1 scale) of a simple skull/scalp around the intracranial mask.

    Distance d (mm) from the ICV: 0-1.5 mm CSF-dark, 1.5-6 mm skull (dark cortical bone with a brighter
    diploe in the middle), 6-11 mm scalp fat (bright), then air.
    """
    d = ndi.distance_transform_edt(~icv) * spacing_mm
    out = np.zeros(icv.shape, np.float32)
    out[(d > 1.5) & (d <= 6)] = 0.12
    out[(d > 3.0) & (d <= 4.5)] = 0.35
    out[(d > 6) & (d <= 11)] = 0.85
    out[(d > 11) & (d <= 12)] = 0.4
    return ndi.gaussian_filter(out, 0.6 / spacing_mm) * (~icv)


def acquire(clean: np.ndarray, scale: float, gamma: float, bias: np.ndarray, noise_sigma: float,
            rng: np.random.Generator | None) -> np.ndarray:
    """``scale * bias * clean^gamma`` plus Rician noise (``sqrt((s + n1)^2 + n2^2)``) when ``rng``."""
    signal = scale * bias * np.power(np.clip(clean, 0, None), gamma)
    if rng is None:
        return signal
    sigma = noise_sigma * scale
    return np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def subject_grid(bank: Bank, spacing: float | None, pad_mm: float = 0.0) -> fields.Grid:
    """The bank grid's extent grown by ``pad_mm`` on every side, sampled at ``spacing`` (same direction)."""
    spacing = float(spacing or bank.grid.spacing[0])
    extent = [(n - 1) * s + 2 * pad_mm for n, s in zip(bank.grid.size, bank.grid.spacing)]
    size = tuple(int(math.floor(e / spacing + 1e-6)) + 1 for e in extent)
    # keep the grid centred on the bank grid's centre
    centre = np.asarray(bank.grid.origin) + bank.grid.index_to_physical @ ((np.asarray(bank.grid.size) - 1) / 2.0)
    direction = bank.grid.direction_matrix
    origin = centre - direction @ (spacing * (np.asarray(size) - 1) / 2.0)
    return fields.Grid(size=size, spacing=(spacing,) * 3, origin=tuple(float(o) for o in origin),
                       direction=bank.grid.direction)


def resample_to_grid(tensor: torch.Tensor, source: fields.Grid, target: fields.Grid) -> torch.Tensor:
    """Resample ``(C, Z, Y, X)`` maps from ``source`` onto ``target`` (linear; zero outside the source).

    Downsampling is anti-aliased by a Gaussian of ``0.5 (ratio - 1)`` source voxels.
    """
    if source.same_as(target):
        return tensor
    sigma = max(0.0, 0.5 * (target.spacing[0] / source.spacing[0] - 1.0))
    data = tensor.numpy()
    if sigma > 0:
        data = np.stack([ndi.gaussian_filter(c, sigma, mode="nearest") for c in data])
    # target voxel index -> source voxel index (both (x, y, z))
    matrix = np.linalg.inv(source.index_to_physical) @ target.index_to_physical
    offset = np.linalg.inv(source.index_to_physical) @ (np.asarray(target.origin) - np.asarray(source.origin))
    points = fields.voxel_coordinates(target.shape, dtype=torch.float64).numpy().reshape(3, -1)
    index = (matrix @ points + offset[:, None]).reshape(3, *target.shape)
    nz, ny, nx = source.shape
    scale = np.array([2.0 / (nx - 1), 2.0 / (ny - 1), 2.0 / (nz - 1)])[:, None, None, None]
    norm = torch.from_numpy(np.moveaxis(index * scale - 1.0, 0, -1)).float()
    return F.grid_sample(torch.from_numpy(np.ascontiguousarray(data)).float().unsqueeze(0), norm.unsqueeze(0),
                         mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def nonlinear_displacement_mm(displacement: torch.Tensor, mask: np.ndarray, spacing_mm: float) -> dict[str, float]:
    """Size of a map's non-affine part inside ``mask``: the best-fitting affine (least squares) removed.

    Returns ``{"rms_mm", "p95_mm"}``; used as the subject's distance from the template.
    """
    points = fields.voxel_coordinates(tuple(displacement.shape[1:]), dtype=torch.float64).numpy()
    inside = mask.astype(bool)
    x = points[:, inside].T * spacing_mm
    y = displacement.numpy()[:, inside].T.astype(np.float64) * spacing_mm
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = np.sqrt(((y - design @ coef) ** 2).sum(1))
    return {"rms_mm": float(np.sqrt(np.mean(residual ** 2))), "p95_mm": float(np.percentile(residual, 95))}


# ---------------------------------------------------------------------------------------------
# Subjects
# ---------------------------------------------------------------------------------------------


@dataclass
class VariedAnatomy:
    """A subject's anatomy made from a template (:func:`varied_anatomy`); tensors on one grid."""

    template: torch.Tensor  # (Z, Y, X) the anatomy template
    maps: torch.Tensor  # (R, Z, Y, X) its partial-volume label maps
    values: list[int]
    names: list[str]
    phi: torch.Tensor  # (3, Z, Y, X) template -> subject: subject = template o phi
    subject_maps: torch.Tensor  # (R, Z, Y, X) the subject's true partial volumes (maps o phi)
    variation_velocity: torch.Tensor  # the atrophy solver's SVF s (exp(s) realises the regional factors)
    achieved: dict  # log-volume changes realised by the solver (before psi)
    goals: dict


def template_on_grid(bank: Bank, cohort: str, age: float, grid: fields.Grid):
    """The bank's ``cohort`` template at ``age`` and its one-hot label maps on ``grid``: (template, maps, values, names)."""
    values = sorted(bank.label_names)
    names = [bank.label_names[v] for v in values]
    template = bank.template_tensor(cohort, age)
    labels = bank.labels_tensor(cohort, age)
    stack = resample_to_grid(torch.cat([template[None], one_hot(labels, values)]), bank.grid, grid)
    return stack[0], stack[1:].clamp(0, 1), values, names


def varied_anatomy(template: torch.Tensor, maps: torch.Tensor, values: list[int], names: list[str],
                   spacing_zyx, factors: dict, rng: np.random.Generator, *, max_displacement_mm: float,
                   smoothness_mm: float, detail_displacement_mm: float = 0.0, detail_smoothness_mm: float = 15.0,
                   affine: dict | None = None, solver: dict | None = None) -> VariedAnatomy:
    """The one generator of subject anatomy that differs from the template (phantom, tests, benchmarks).

    ``phi = exp(s) o psi``: ``exp(s)`` realises the regional volume ``factors`` (region name -> factor of the
    template's volume; the atrophy solver :func:`atrophy.solve_ageing_svf` on the template's own
    partial-volume maps, ``solver`` its keyword arguments; a factor of 1 holds that region's volume;
    skipped when no factor names a region of ``names``) and
    ``psi = A o exp(r_L) o exp(r_D)`` is a random inter-subject diffeomorphism: ``r_L`` smooth at
    ``smoothness_mm`` with largest vector ``max_displacement_mm``, ``r_D`` (only when
    ``detail_displacement_mm`` > 0) at ``detail_smoothness_mm``, ``A`` a :func:`random_affine_displacement`
    with the keyword arguments ``affine`` (``None``: no affine).  Random draws in that order from ``rng``.
    """
    shape = tuple(template.shape)
    spacing = float(spacing_zyx[2])
    prescribed = {k: math.log(f) for k, f in factors.items() if k in names}
    if prescribed:
        solution = atrophy.solve_ageing_svf(maps, names, prescribed, spacing_zyx, **(solver or {}))
        velocity, achieved, goals = solution.velocity, solution.achieved, solution.goals
    else:
        velocity, achieved, goals = torch.zeros((3, *shape)), {}, {}
    large = torch.from_numpy(smooth_noise(shape, spacing_zyx, smoothness_mm, rng, channels=3)).float()
    psi = fields.exp(large * (max_displacement_mm / spacing))
    if detail_displacement_mm > 0:
        detail = torch.from_numpy(smooth_noise(shape, spacing_zyx, detail_smoothness_mm, rng, channels=3)).float()
        psi = fields.compose(psi, fields.exp(detail * (detail_displacement_mm / spacing)))
    if affine is not None:
        psi = fields.compose(random_affine_displacement(shape, spacing_zyx, rng, **affine), psi)
    phi = fields.compose(fields.exp(velocity), psi) if prescribed else psi
    return VariedAnatomy(template=template, maps=maps, values=values, names=names, phi=phi,
                         subject_maps=fields.warp(maps, phi), variation_velocity=velocity,
                         achieved=achieved, goals=goals)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _subject_plan(index: int, seed: int, config: PhantomConfig, bank: Bank) -> dict:
    rng = np.random.default_rng([seed, index, 1])
    group = GROUPS[index % len(GROUPS)]
    lo, hi = BASELINE_AGE_RANGES[group]
    last = max(config.followup_years)
    top = min(bank.age_range("HC")[1], bank.age_range("AD")[1]) - last
    hi = min(hi, top)
    if hi <= lo:
        raise InputError(f"follow-ups up to +{last:g} y do not fit in the bank's age range")
    age = round(float(rng.uniform(lo, hi)), 1)
    transition = round(float(age + rng.uniform(1.0, max(1.5, last - 1.0))), 1) if group == "HC->AD" else None
    multipliers = {name: float(np.exp(rng.normal(0.0, RATE_SIGMA))) for name in bank.model.regions} if bank.model else {}
    hippocampus = _log_uniform(rng, config.hippocampus_factor)
    brain = float(rng.uniform(*config.brain_factor))
    every = config.pipeline_every
    return {
        "subject": f"sub-{index:03d}",
        "group": group,
        "baseline_age": age,
        "transition_age": transition,
        "rate_multipliers": multipliers,
        "input": "head" if every > 0 and (index // 3) % every == 0 else "stripped",
        "anatomy_factors": {
            "lateral_ventricles": _log_uniform(rng, config.ventricle_factor),
            "hippocampus": hippocampus,
            "amygdala": hippocampus * float(np.exp(rng.normal(0.0, 0.08))),
            "cortical_gm": brain * float(np.exp(rng.normal(0.0, 0.02))),
            "subcortical_gm": brain * float(np.exp(rng.normal(0.0, 0.04))),
            "cerebral_wm": brain * float(np.exp(rng.normal(0.0, 0.03))),
        },
        "icv_factor": float(rng.uniform(*config.icv_factor)),
        "max_displacement_mm": float(rng.uniform(*config.max_displacement_mm)),
        "detail_displacement_mm": float(rng.uniform(*config.detail_displacement_mm)),
        "pattern_contrast": float(rng.uniform(*config.pattern_contrast)),
        "intensity_scale": float(rng.uniform(800, 1200)),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "noise": float(rng.uniform(*config.noise)),
    }


def _pattern_maps(maps: torch.Tensor, names: list[str], targets: dict[str, float], contrast: float,
                  spacing_zyx, smoothness_mm: float, rng: np.random.Generator):
    """Split each tissue region by a smooth random weight into two parts with rates ``g exp(+-contrast)``."""
    out_maps, out_names, out_targets = [], [], {}
    for name, region in zip(names, maps):
        if name not in TISSUE_REGIONS or name not in targets:
            out_maps.append(region)
            out_names.append(name)
            if name in targets:
                out_targets[name] = targets[name]
            continue
        weight = torch.from_numpy(1.0 / (1.0 + np.exp(-4.0 * smooth_noise(tuple(region.shape), spacing_zyx,
                                                                             smoothness_mm, rng)[0]))).float()
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        out_maps += [region * weight, region * (1.0 - weight)]
        out_names += [f"{name}:a", f"{name}:b"]
        out_targets[f"{name}:a"] = targets[name] * math.exp(sign * contrast)
        out_targets[f"{name}:b"] = targets[name] * math.exp(-sign * contrast)
    return torch.stack(out_maps), out_names, out_targets


@dataclass
class SubjectAnatomy:
    """One phantom subject's baseline anatomy before acquisition (see :func:`subject_anatomy`).

    ``phi`` (subject grid, voxel units) maps the subject's grid onto the anatomy template's:
    ``subject = template o phi``; ``subject_maps = maps o phi`` are its partial-volume region maps.
    ``rng`` is the subject's random stream after the anatomy draws (acquisition draws continue it).
    """

    plan: dict
    rng: np.random.Generator
    spacing_zyx: tuple
    voxel_ml: float
    values: list
    names: list
    template: torch.Tensor
    maps: torch.Tensor
    template_volumes: dict
    varied: VariedAnatomy  # the generator's output (phi, subject_maps and the volume solve)
    phi: torch.Tensor
    subject_maps: torch.Tensor


def subject_anatomy(index: int, bank: Bank, grid: fields.Grid, config: PhantomConfig) -> SubjectAnatomy:
    """Steps 1a-1b of the module docstring for subject ``index``: deterministic for the seed, so the
    evaluation can rebuild a written phantom's true template -> subject map and partial-volume maps."""
    plan = _subject_plan(index, config.seed, config, bank)
    rng = np.random.default_rng([config.seed, index, 2])
    spacing_zyx = tuple(reversed(grid.spacing))
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    start_cohort = "AD" if plan["group"] == "AD" else "HC"
    listed = bank.ages(start_cohort)
    anatomy_age = min(listed, key=lambda a: abs(a - plan["baseline_age"]))
    plan["anatomy_template"] = {"cohort": start_cohort, "age": anatomy_age}

    template, maps, values, names = template_on_grid(bank, start_cohort, anatomy_age, grid)
    template_volumes = summary_volumes_from_maps(maps, values, bank.label_names, voxel_ml)

    # (a) regional volumes of the anatomy, (b) random diffeomorphism psi = A o exp(r_L) o exp(r_D)
    factors = dict(plan["anatomy_factors"])
    for parcel in CORTICAL_PARCEL_LABELS.values():  # a regional bank's cortical parcels follow the cortex
        if parcel in names:
            factors[parcel] = factors["cortical_gm"]
    anatomy = varied_anatomy(
        template, maps, values, names, spacing_zyx, factors, rng,
        max_displacement_mm=plan["max_displacement_mm"], smoothness_mm=config.smoothness_mm,
        detail_displacement_mm=plan["detail_displacement_mm"], detail_smoothness_mm=config.detail_smoothness_mm,
        affine={"scale": plan["icv_factor"] ** (-1.0 / 3.0), "anisotropy": 0.03, "degrees": 6.0, "shift_mm": 5.0},
        solver={"balance_region": bank.model.balance_region, "solve_spacing_mm": config.solve_spacing_mm,
                "full_rounds": config.solver_rounds})
    phi, subject_maps = anatomy.phi, anatomy.subject_maps
    return SubjectAnatomy(plan=plan, rng=rng, spacing_zyx=spacing_zyx, voxel_ml=voxel_ml, values=values, names=names,
                          template=template, maps=maps, template_volumes=template_volumes, varied=anatomy,
                          phi=phi, subject_maps=subject_maps)


def subject_truth_solution(anatomy: SubjectAnatomy, bank: Bank, config: PhantomConfig, age: float,
                           multipliers: dict[str, float] | None = None) -> atrophy.AtrophySolution:
    """The ``subject`` truth's atrophy solve from the baseline to ``age`` on the subject's own maps.

    ``multipliers`` default to the subject's drawn rate multipliers (the truth); ``{}`` gives the
    cohort's mean rates with the same group and conversion age (the evaluation's ``oracle-cohort``).
    """
    plan = anatomy.plan
    target_cohort = "HC" if plan["group"] == "HC" else "AD"
    chosen = plan["rate_multipliers"] if multipliers is None else multipliers
    targets = bank.model.targets(target_cohort, plan["baseline_age"], age, plan["transition_age"], chosen)
    return atrophy.solve_ageing_svf(anatomy.subject_maps, anatomy.names, targets, anatomy.spacing_zyx,
                                    balance_region=bank.model.balance_region,
                                    solve_spacing_mm=config.solve_spacing_mm, full_rounds=config.solver_rounds,
                                    source_maps=anatomy.maps, pre_displacement=anatomy.phi)


def make_subject(index: int, bank: Bank, grid: fields.Grid, config: PhantomConfig, log=print) -> tuple[dict, list[dict]]:
    """Build one subject: returns (plan, scans); each scan holds numpy images, label maps and, for
    follow-ups, one entry per truth in ``scan["truths"]``."""
    a = subject_anatomy(index, bank, grid, config)
    plan, rng, spacing_zyx, voxel_ml, values, names = a.plan, a.rng, a.spacing_zyx, a.voxel_ml, a.values, a.names
    template, maps, template_volumes, phi, subject_maps = a.template, a.maps, a.template_volumes, a.phi, a.subject_maps
    shape = tuple(template.shape)
    icv = (subject_maps.sum(0) > 0.5).numpy()
    min_jac = float(fields.jacobian_determinant(phi).min())
    base_volumes = summary_volumes_from_maps(subject_maps, values, bank.label_names, voxel_ml)
    icv_ml = float(subject_maps.sum()) * voxel_ml
    plan["anatomy"] = {
        "template_volumes_ml": {k: round(v, 3) for k, v in template_volumes.items()},
        "template_icv_ml": round(float(maps.sum()) * voxel_ml, 2),
        "icv_ml": round(icv_ml, 2),
        "brain_to_icv": round(base_volumes["whole_brain"] / icv_ml, 4),
        "template_brain_to_icv": round(template_volumes["whole_brain"] / (float(maps.sum()) * voxel_ml), 4),
        "volume_ratio_to_template": {k: round(base_volumes[k] / template_volumes[k], 4) for k in base_volumes},
        "min_jacobian": round(min_jac, 4),
        "largest_displacement_mm": round(fields.max_norm(phi) * grid.spacing[0], 2),
        "nonlinear_displacement": {k: round(v, 3) for k, v in nonlinear_displacement_mm(phi, icv, grid.spacing[0]).items()},
    }

    # acquisition parameters
    bias = np.exp(config.bias_amplitude * smooth_noise(shape, spacing_zyx, 80.0, rng)[0])
    skull = synthetic_skull(icv, grid.spacing[0])
    pattern_rng = np.random.default_rng([config.seed, index, 3])

    def render(disp: torch.Tensor) -> dict:
        scan_maps = fields.warp(maps, disp)
        scan_labels = argmax_labels(scan_maps, values).numpy()
        brain = fields.warp(template, disp).numpy()
        head = np.where(scan_labels > 0, brain, skull)
        return {"maps": scan_maps, "labels": scan_labels, "brain": brain, "head": head,
                "volumes_ml": summary_volumes_from_maps(scan_maps, values, bank.label_names, voxel_ml)}

    scans = []
    ages = [plan["baseline_age"]] + [round(plan["baseline_age"] + y, 1) for y in config.followup_years]
    for k, age in enumerate(ages):
        scan = {"scan": k, "age": age, "truths": {}}
        if k == 0:
            scan.update(render(phi))
            scan.update(goals={}, achieved={}, min_jacobian=min_jac)
        else:
            target_cohort = "HC" if plan["group"] == "HC" else "AD"
            targets = bank.model.targets(target_cohort, plan["baseline_age"], age, plan["transition_age"],
                                         plan["rate_multipliers"])
            for truth in config.truths:
                if truth == "subject":
                    solution = subject_truth_solution(a, bank, config, age)
                else:
                    split, split_names, split_targets = _pattern_maps(
                        subject_maps, names, targets, plan["pattern_contrast"], spacing_zyx,
                        config.pattern_smoothness_mm, pattern_rng)
                    solution = atrophy.solve_ageing_svf(split, split_names, split_targets, spacing_zyx,
                                                        balance_region=bank.model.balance_region,
                                                        solve_spacing_mm=config.solve_spacing_mm,
                                                        full_rounds=config.solver_rounds)
                true_map = fields.exp(solution.velocity)  # baseline -> follow-up, subject grid
                rendered = render(fields.compose(phi, true_map))
                rendered.update(field=true_map, goals=solution.goals, achieved=solution.achieved,
                                min_jacobian=solution.min_jacobian)
                scan["truths"][truth] = rendered
            scan.update(scan["truths"]["subject"])
        scan_bias = bias * np.exp(0.03 * smooth_noise(shape, spacing_zyx, 80.0, rng)[0])
        scan["observed_head"] = acquire(scan["head"], plan["intensity_scale"], plan["gamma"], scan_bias, plan["noise"], rng)
        for entry in [scan] + list(scan["truths"].values()):
            entry["clean"] = acquire(entry["brain"] * (entry["labels"] > 0), plan["intensity_scale"], plan["gamma"],
                                     bias, 0.0, None)
        scans.append(scan)
    return plan, scans


@dataclass
class VariedSubject:
    """One subject from :func:`varied_subject` (an acquired image with its known labels)."""

    image: sitk.Image  # the acquired T1 (float32, scanner-like units)
    labels: sitk.Image  # true label map (argmax of the true partial volumes), uint8
    maps: torch.Tensor  # (R, Z, Y, X) true partial volumes of ``values`` on the image's grid
    values: list[int]
    volumes_ml: dict[str, float]  # true summary-region volumes
    achieved: dict[str, float]  # log-volume changes realised by the solver (before psi)
    plan: dict


def varied_subject(bank: Bank, age: float, ventricle_factor: float = 1.0, hippocampus_factor: float = 1.0,
                   amygdala_factor: float | None = None, seed: int = 0, cohort: str = "HC",
                   spacing: float | None = None, skull: bool = True, max_displacement_mm: float = 6.0,
                   noise: float = 0.02, bias_amplitude: float = 0.15, solve_spacing_mm: float = 3.0) -> VariedSubject:
    """One stand-alone subject (no follow-ups) for evaluations and tests of the subject's own volumes.

    The ``cohort`` template at ``age`` on a grid of ``spacing`` mm (default: the bank's) with ventricles x
    ``ventricle_factor``, hippocampi x ``hippocampus_factor`` and amygdalae x ``amygdala_factor`` (default:
    the hippocampal factor), made by :func:`varied_anatomy` (the phantom's generator) with a random
    inter-subject warp (``max_displacement_mm`` at 15 mm smoothness and a small random affine), optionally
    a synthetic skull and scalp, then acquired with a smooth bias (``bias_amplitude``), a contrast gamma
    and Rician noise (``noise``).  Used by ``benchmarks/bench_subject_volumes.py`` and
    ``Testing/test_anatomy.py``; never built from Colin27.
    """
    rng = np.random.default_rng([seed, 77])
    grid = subject_grid(bank, spacing)
    spacing_zyx = tuple(reversed(grid.spacing))
    template, maps, values, names = template_on_grid(bank, cohort, age, grid)
    shape = tuple(template.shape)
    factors = {"lateral_ventricles": ventricle_factor, "hippocampus": hippocampus_factor,
               "amygdala": hippocampus_factor if amygdala_factor is None else amygdala_factor}
    changed = {k: f for k, f in factors.items() if abs(f - 1.0) > 1e-6}  # the others are left free
    anatomy = varied_anatomy(template, maps, values, names, spacing_zyx, changed, rng,
                             max_displacement_mm=max_displacement_mm, smoothness_mm=15.0, affine={},
                             solver={"solve_spacing_mm": solve_spacing_mm})
    clean = fields.warp(template, anatomy.phi).numpy()
    subject_maps = anatomy.subject_maps.clamp(0, 1)
    subject_labels = argmax_labels(subject_maps, values).numpy()
    if skull:
        clean = np.where(subject_labels > 0, clean, synthetic_skull(subject_labels > 0, grid.spacing[0]))
    scale, gamma = float(rng.uniform(800, 1200)), float(rng.uniform(0.9, 1.1))
    bias = np.exp(bias_amplitude * smooth_noise(shape, spacing_zyx, 80.0, rng)[0])
    observed = acquire(clean, scale, gamma, bias, noise, rng if noise > 0 else None)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    image = grid.apply_to(sitk.GetImageFromArray(observed.astype(np.float32)))
    label_image = sitk.Cast(grid.apply_to(sitk.GetImageFromArray(subject_labels.astype(np.uint8))), sitk.sitkUInt8)
    return VariedSubject(
        image=image, labels=label_image, maps=subject_maps, values=values,
        volumes_ml=summary_volumes_from_maps(subject_maps, values, bank.label_names, voxel_ml),
        achieved=anatomy.achieved,
        plan={"age": age, "cohort": cohort, "seed": seed, "factors": factors, "skull": skull,
              "max_displacement_mm": max_displacement_mm, "noise": noise, "bias_amplitude": bias_amplitude,
              "spacing": grid.spacing[0]},
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_subject(index: int, staging: Path, config: PhantomConfig, bank_path: str | None, grid: fields.Grid,
                   bank: Bank | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Build subject ``index`` and write its files under ``staging``; returns (record, cohort rows, truth rows).

    A top-level function of plain arguments so that subjects can be mapped over worker processes.
    """
    staging = Path(staging)
    bank = bank or load_bank(bank_path)
    t0 = time.time()
    plan, scans = make_subject(index, bank, grid, config)
    name = plan["subject"]
    rows, truth_rows = [], []
    for scan in scans:
        stem = f"{name}/{name}_scan-{scan['scan']}"
        mask = (scan["labels"] > 0).astype(np.uint8)
        paths = {"path": f"{stem}_T1w.nii.gz", "clean_path": f"{stem}_clean.nii.gz",
                 "labels_path": f"{stem}_labels.nii.gz", "mask_path": f"{stem}_mask.nii.gz",
                 "head_path": f"{stem}_head.nii.gz"}
        _write(np.round(scan["observed_head"] * mask).clip(0, 32767), grid, staging / paths["path"], sitk.sitkInt16)
        _write(np.round(scan["observed_head"]).clip(0, 32767), grid, staging / paths["head_path"], sitk.sitkInt16)
        _write(np.round(scan["clean"]).clip(0, 32767), grid, staging / paths["clean_path"], sitk.sitkInt16)
        _write(scan["labels"], grid, staging / paths["labels_path"], sitk.sitkUInt8)
        _write(mask, grid, staging / paths["mask_path"], sitk.sitkUInt8)
        rows.append({"subject": name, "scan": scan["scan"], "age": f"{scan['age']:.1f}", "group": plan["group"],
                     "transition_age": "" if plan["transition_age"] is None else f"{plan['transition_age']:.1f}",
                     **paths, "input": plan["input"]})
        record = {"scan": scan["scan"], "age": scan["age"],
                  "volumes_ml": {k: round(v, 3) for k, v in scan["volumes_ml"].items()}, "truths": {}}
        for truth, entry in scan["truths"].items():
            tstem = f"{stem}_truth-{truth}"
            tpaths = {"clean_path": paths["clean_path"], "labels_path": paths["labels_path"],
                      "mask_path": paths["mask_path"], "field_path": f"{tstem}_field.nii.gz"}
            if truth != "subject":
                tpaths.update(clean_path=f"{tstem}_clean.nii.gz", labels_path=f"{tstem}_labels.nii.gz",
                              mask_path=f"{tstem}_mask.nii.gz")
                _write(np.round(entry["clean"]).clip(0, 32767), grid, staging / tpaths["clean_path"], sitk.sitkInt16)
                _write(entry["labels"], grid, staging / tpaths["labels_path"], sitk.sitkUInt8)
                _write((entry["labels"] > 0).astype(np.uint8), grid, staging / tpaths["mask_path"], sitk.sitkUInt8)
            image = sitk.Cast(fields.field_to_sitk(entry["field"], grid), sitk.sitkVectorFloat32)
            io.write_image(image, staging / tpaths["field_path"])
            truth_rows.append({"subject": name, "scan": scan["scan"], "age": f"{scan['age']:.1f}", "truth": truth, **tpaths})
            record["truths"][truth] = {
                "min_jacobian": round(entry["min_jacobian"], 4),
                "volumes_ml": {k: round(v, 3) for k, v in entry["volumes_ml"].items()},
                "log_volume_change_goal": {k: round(v, 5) for k, v in entry["goals"].items()},
                "log_volume_change_achieved": {k: round(v, 5) for k, v in entry["achieved"].items()},
            }
        if scan["truths"]:  # backwards-compatible keys: the 'subject' truth
            first = record["truths"]["subject"]
            record.update(min_jacobian=first["min_jacobian"], log_volume_change_goal=first["log_volume_change_goal"],
                          log_volume_change_achieved=first["log_volume_change_achieved"])
        else:
            record.update(min_jacobian=round(scan["min_jacobian"], 4), log_volume_change_goal={},
                          log_volume_change_achieved={})
        plan.setdefault("scans", []).append(record)
    plan["seconds"] = round(time.time() - t0, 1)
    return plan, rows, truth_rows


def _write_subject_job(job: tuple) -> tuple[dict, list[dict], list[dict]]:
    """:func:`_write_subject` on one packed job: what the cohort engine maps over subjects."""
    return _write_subject(*job)


def make_phantom(out_dir: str | Path, config: PhantomConfig | None = None, bank: Bank | None = None,
                 overwrite: bool = False, log=print, cluster=None) -> Path:
    """Write a synthetic longitudinal cohort to ``out_dir`` (atomically); returns its path.

    Subjects are built by :func:`inbrainsyn.parallel.map_subjects`: here, on a local Dask cluster of
    ``config.workers`` processes, or on ``cluster`` (a :class:`inbrainsyn.parallel.ClusterOptions` or a
    ``distributed.Client``).
    """
    from inbrainsyn import parallel

    config = config or PhantomConfig()
    config.validate()
    bank = bank or load_bank(None)
    if bank.model is None:
        raise InputError(f"bank '{bank.name}' has no atrophy_model; the phantom needs a model bank (e.g. the default bank)")
    _subject_plan(0, config.seed, config, bank)  # checks the ages fit before any work
    grid = subject_grid(bank, config.spacing, config.pad_mm)
    started = time.time()
    results = []
    with io.staged_output_dir(out_dir, overwrite) as staging:
        indices = range(config.first_index, config.first_index + config.subjects)
        for index in indices:
            (staging / f"sub-{index:03d}").mkdir()
        if cluster is None and config.workers > 1:
            cluster = parallel.ClusterOptions(workers=config.workers, threads_per_worker=1, device="cpu")
        # every subject is deterministic for the seed: the same files here or on any Dask worker
        jobs = {f"sub-{i:03d}": (i, str(staging), config, None if cluster is None else str(bank.root), grid,
                                 bank if cluster is None else None) for i in indices}
        outcomes = parallel.map_subjects(_write_subject_job, jobs, cluster)
        failed = [o for o in outcomes.values() if o.status != "ok"]
        if failed:  # bad settings fail every subject alike: report them as the input error they are
            kind = InputError if failed[0].exit_code == InputError.exit_code else ProcessingError
            raise kind("; ".join(f"{o.key}: {o.error}" for o in failed))
        for key in jobs:
            results.append(outcomes[key].value)
            _log_subject(results[-1][0], log)
        records = [r[0] for r in results]
        _write_csv([row for r in results for row in r[1]], staging / "cohort.csv", COHORT_COLUMNS)
        _write_csv([row for r in results for row in r[2]], staging / "truths.csv", TRUTH_COLUMNS)
        io.write_json({
            "tool": "inbrainsyn", "command": "phantom",
            "bank": bank.name, "bank_path": str(bank.root),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()},
            "grid": {"size": grid.size, "spacing": grid.spacing, "origin": grid.origin, "direction": grid.direction},
            "label_names": {str(k): v for k, v in bank.label_names.items()},
            "atrophy_model": bank.model.to_json(),
            "seconds": round(time.time() - started, 1),
            "subjects": records,
        }, staging / "phantom.json")
    return Path(out_dir)


def _log_subject(plan: dict, log) -> None:
    ratios = plan["anatomy"]["volume_ratio_to_template"]
    log(f"{plan['subject']} ({plan['group']}, {plan['baseline_age']:.1f} y, input {plan['input']}): ventricles "
        f"x{ratios['ventricles']:.2f}, hippocampus x{ratios['hippocampus']:.2f}, ICV {plan['anatomy']['icv_ml']:.0f} mL, "
        f"non-affine {plan['anatomy']['nonlinear_displacement']['rms_mm']:.1f} mm rms; {plan['seconds']:.1f}s")


def _write(array: np.ndarray, grid: fields.Grid, path: Path, pixel_type) -> None:
    image = grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    io.write_image(sitk.Cast(image, pixel_type), path)


def _write_csv(rows: list[dict], path: Path, columns=COHORT_COLUMNS) -> None:
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def read_cohort(folder: str | Path) -> list[dict]:
    """Rows of a phantom's ``cohort.csv`` with absolute paths and typed ages."""
    folder = Path(folder)
    path = folder / "cohort.csv"
    if not path.exists():
        raise InputError(f"{path}: missing; is {folder} a phantom made by `inbrainsyn phantom`?")
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            row["age"] = float(row["age"])
            row["scan"] = int(row["scan"])
            row["transition_age"] = float(row["transition_age"]) if row["transition_age"] else None
            for key in ("path", "labels_path", "mask_path", "clean_path", "head_path"):
                if row.get(key):
                    row[key] = str(folder / row[key])
            row["input"] = row.get("input") or "stripped"
            rows.append(row)
    return rows


def read_truths(folder: str | Path) -> list[dict]:
    """Rows of a phantom's ``truths.csv`` (absolute paths); empty for a phantom made before it existed."""
    folder = Path(folder)
    path = folder / "truths.csv"
    if not path.exists():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            row["age"] = float(row["age"])
            row["scan"] = int(row["scan"])
            for key in ("clean_path", "labels_path", "mask_path", "field_path"):
                row[key] = str(folder / row[key])
            rows.append(row)
    return rows
