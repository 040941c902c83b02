"""Ground-truth ageing phantom: a synthetic longitudinal cohort with known follow-ups.

Each subject is built as follows (all deterministic for a seed):

1. **Anatomy.**  The bank template (and its labels) of the subject's starting cohort at the listed age
   nearest to the baseline age, warped by a random inter-subject diffeomorphism
   ``psi = A o exp(r)``: ``r`` a smooth random SVF (largest displacement 4-8 mm, smoothness ~15 mm) and
   ``A`` a small affine (scaling +-5 %, rotation +-4 degrees, shift +-3 mm).  Partial-volume label maps
   are warped with the image (trilinear), so the subject's own regions are known exactly.
2. **Group.**  HC, AD, or HC->AD converter (round robin), a baseline age and, for converters, a
   conversion age between the baseline and the last follow-up.
3. **True follow-ups** at baseline + ``followup_years``: the atrophy model's regional log-volume
   changes (HC / AD / converter rates, times subject-specific lognormal rate multipliers, sigma 0.2)
   are *solved on the subject's own partial-volume maps* with :func:`atrophy.solve_ageing_svf`, and the
   subject's anatomy is warped by ``psi o exp(u)``.  No template-to-subject transport is involved,
   so the truth does not favour any transport method by construction.
4. **Acquisition.**  Per subject: intensity scale, contrast gamma and a smooth multiplicative bias
   field; per scan: a small extra bias variation and Rician noise.  Images are stored as int16
   (arbitrary scanner units, white matter ~ 700-1100); ``clean`` images omit the per-scan bias
   variation and the noise.  Optionally a synthetic skull and scalp surround the brain.

Outputs in ``DIR``: ``cohort.csv`` (subject, scan, age, group, transition_age, path, labels_path,
mask_path, clean_path; paths relative to DIR), ``phantom.json`` (parameters, per-scan prescribed and
achieved regional log-volume changes, and the true summary-region volumes ``volumes_ml`` measured on
the warped partial-volume maps) and per subject ``sub-XXX/`` images, label maps and masks.  The label
maps are the argmax of the warped partial-volume maps; for the small changes of a few years prefer
``volumes_ml`` to counting label voxels (sub-voxel changes are quantised in hard labels).
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import time
from dataclasses import dataclass
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
from inbrainsyn.templates.regions import argmax_labels, one_hot, summary_volumes_from_maps

GROUPS = ("HC", "AD", "HC->AD")
BASELINE_AGE_RANGES = {"HC": (60.0, 82.0), "AD": (65.0, 82.0), "HC->AD": (62.0, 80.0)}
RATE_SIGMA = 0.2
COHORT_COLUMNS = ("subject", "scan", "age", "group", "transition_age", "path", "labels_path", "mask_path", "clean_path")


@dataclass
class PhantomConfig:
    subjects: int = 25
    seed: int = 0
    spacing: float | None = None  # mm; None = the bank's spacing
    followup_years: tuple[float, ...] = (2.0, 4.0, 6.0)
    max_displacement_mm: tuple[float, float] = (4.0, 8.0)
    smoothness_mm: float = 15.0
    noise: tuple[float, float] = (0.015, 0.035)  # Rician sigma as a fraction of the WM intensity
    bias_amplitude: float = 0.15
    skull: bool = False
    solve_spacing_mm: float = 3.0
    solver_rounds: int = 3  # full-grid defect corrections of the atrophy solver (3 in the bank builder)

    def validate(self) -> None:
        if self.subjects < 1:
            raise InputError(f"--subjects must be at least 1, got {self.subjects}")
        if not self.followup_years or any(y <= 0 for y in self.followup_years):
            raise InputError(f"follow-up intervals must be positive years, got {self.followup_years}")
        if self.spacing is not None and not 0.5 <= self.spacing <= 4.0:
            raise InputError(f"--spacing must be between 0.5 and 4 mm, got {self.spacing}")


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


def random_affine_displacement(shape, spacing_zyx, rng: np.random.Generator) -> torch.Tensor:
    """Displacement ``(3, Z, Y, X)`` (voxel units) of a small random affine about the volume centre."""
    angles = np.deg2rad(rng.uniform(-4, 4, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    matrix = rz @ ry @ rx @ np.diag(rng.uniform(0.95, 1.05, 3))
    shift_mm = rng.uniform(-3, 3, 3)
    spacing_xyz = np.array(spacing_zyx[::-1])
    points = fields.voxel_coordinates(shape, dtype=torch.float64).numpy().reshape(3, -1) * spacing_xyz[:, None]
    centre = points.mean(1, keepdims=True)
    moved = matrix @ (points - centre) + centre + shift_mm[:, None]
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
# Phantom
# ---------------------------------------------------------------------------------------------


def _subject_grid(bank: Bank, spacing: float | None) -> fields.Grid:
    if spacing is None or abs(spacing - bank.grid.spacing[0]) < 1e-6:
        return bank.grid
    size = tuple(int(math.floor((n - 1) * s / spacing)) + 1 for n, s in zip(bank.grid.size, bank.grid.spacing))
    return fields.Grid(size=size, spacing=(spacing,) * 3, origin=bank.grid.origin, direction=bank.grid.direction)


def _resample(tensor: torch.Tensor, source: fields.Grid, target: fields.Grid) -> torch.Tensor:
    """Resample ``(C, Z, Y, X)`` maps from the bank grid to the subject grid (same origin, corner-aligned)."""
    if source.same_as(target):
        return tensor
    sigma = max(0.0, 0.5 * (target.spacing[0] / source.spacing[0] - 1.0))
    data = tensor.numpy()
    if sigma > 0:
        data = np.stack([ndi.gaussian_filter(c, sigma, mode="nearest") for c in data])
    # target voxel centres in source voxel coordinates (shared origin and direction)
    scale = [target.spacing[a] / source.spacing[a] for a in (2, 1, 0)]
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) * sc for n, sc in zip(target.shape, scale)],
                             indexing="ij")
    nz, ny, nx = source.shape
    norm = torch.stack((2 * x / (nx - 1) - 1, 2 * y / (ny - 1) - 1, 2 * z / (nz - 1) - 1), dim=-1).float()
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(data)).float().unsqueeze(0), norm.unsqueeze(0),
                        mode="bilinear", padding_mode="border", align_corners=True)[0]
    return out


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
    return {
        "subject": f"sub-{index:03d}",
        "group": group,
        "baseline_age": age,
        "transition_age": transition,
        "rate_multipliers": multipliers,
        "max_displacement_mm": float(rng.uniform(*config.max_displacement_mm)),
        "intensity_scale": float(rng.uniform(800, 1200)),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "noise": float(rng.uniform(*config.noise)),
    }


def make_subject(index: int, bank: Bank, grid: fields.Grid, config: PhantomConfig, log=print) -> tuple[dict, list[dict]]:
    """Build one subject: returns (plan, scans) with scans holding numpy images and label maps."""
    plan = _subject_plan(index, config.seed, config, bank)
    rng = np.random.default_rng([config.seed, index, 2])
    spacing_zyx = tuple(reversed(grid.spacing))
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    start_cohort = "AD" if plan["group"] == "AD" else "HC"
    listed = bank.ages(start_cohort)
    anatomy_age = min(listed, key=lambda a: abs(a - plan["baseline_age"]))
    plan["anatomy_template_age"] = anatomy_age

    values = sorted(bank.label_names)
    names = [bank.label_names[v] for v in values]
    template = bank.template_tensor(start_cohort, anatomy_age)
    labels = bank.labels_tensor(start_cohort, anatomy_age)
    maps = _resample(torch.cat([template[None], one_hot(labels, values)]), bank.grid, grid)
    template, maps = maps[0], maps[1:].clamp(0, 1)
    shape = tuple(template.shape)

    # inter-subject diffeomorphism psi = A o exp(r)
    r = torch.from_numpy(smooth_noise(shape, spacing_zyx, config.smoothness_mm, rng, channels=3)).float()
    r = r * (plan["max_displacement_mm"] / grid.spacing[0])
    psi = fields.compose(random_affine_displacement(shape, spacing_zyx, rng), fields.exp(r))
    subject_maps = fields.warp(maps, psi)

    # acquisition parameters
    bias = np.exp(config.bias_amplitude * smooth_noise(shape, spacing_zyx, 80.0, rng)[0])
    skull = None
    if config.skull:
        icv = (argmax_labels(subject_maps, values) > 0).numpy()
        skull = synthetic_skull(icv, grid.spacing[0])

    scans = []
    ages = [plan["baseline_age"]] + [round(plan["baseline_age"] + y, 1) for y in config.followup_years]
    for k, age in enumerate(ages):
        if k == 0:
            disp, goals, achieved, min_jac = psi, {}, {}, 1.0
        else:
            target_cohort = "HC" if plan["group"] == "HC" else "AD"
            targets = bank.model.targets(target_cohort, plan["baseline_age"], age, plan["transition_age"],
                                         plan["rate_multipliers"])
            solution = atrophy.solve_ageing_svf(subject_maps, names, targets, spacing_zyx,
                                                balance_region=bank.model.balance_region,
                                                solve_spacing_mm=config.solve_spacing_mm,
                                                full_rounds=config.solver_rounds,
                                                source_maps=maps, pre_displacement=psi)
            disp = fields.compose(psi, fields.exp(solution.velocity))
            goals, achieved, min_jac = solution.goals, solution.achieved, solution.min_jacobian
        clean = fields.warp(template, disp).numpy()
        scan_maps = fields.warp(maps, disp)
        scan_labels = argmax_labels(scan_maps, values).numpy()
        volumes = summary_volumes_from_maps(scan_maps, values, bank.label_names, voxel_ml)
        if skull is not None:
            clean = np.where(scan_labels > 0, clean, skull)
        scan_bias = bias * np.exp(0.03 * smooth_noise(shape, spacing_zyx, 80.0, rng)[0])
        clean_acq = acquire(clean, plan["intensity_scale"], plan["gamma"], bias, 0.0, None)
        observed = acquire(clean, plan["intensity_scale"], plan["gamma"], scan_bias, plan["noise"], rng)
        scans.append({
            "scan": k, "age": age, "image": observed, "clean": clean_acq, "labels": scan_labels,
            "mask": (scan_labels > 0).astype(np.uint8),
            "goals": goals, "achieved": achieved, "min_jacobian": min_jac, "volumes_ml": volumes,
        })
    return plan, scans


def make_phantom(out_dir: str | Path, config: PhantomConfig | None = None, bank: Bank | None = None,
                 overwrite: bool = False, log=print, cluster=None) -> Path:
    """Write a synthetic longitudinal cohort to ``out_dir`` (atomically); returns its path.

    ``cluster``: a :class:`inbrainsyn.parallel.ClusterOptions` (or a ``distributed.Client``) to build
    the subjects on Dask workers (same files as in this process: every subject is deterministic for the seed).
    """
    from inbrainsyn import parallel

    config = config or PhantomConfig()
    config.validate()
    bank = bank or load_bank(None)
    if bank.model is None:
        raise InputError(f"bank '{bank.name}' has no atrophy_model; the phantom needs a model bank (e.g. the default bank)")
    grid = _subject_grid(bank, config.spacing)
    started = time.time()
    rows, records = [], []
    with io.staged_output_dir(out_dir, overwrite) as staging:
        jobs = {f"sub-{index:03d}": (index, bank if cluster is None else str(bank.root), grid, config, str(staging))
                for index in range(config.subjects)}
        outcomes = parallel.map_subjects(_write_subject, jobs, cluster)
        failed = [o for o in outcomes.values() if o.status != "ok"]
        if failed:  # bad settings fail every subject alike: report them as the input error they are
            kind = InputError if failed[0].exit_code == InputError.exit_code else ProcessingError
            raise kind("; ".join(f"{o.key}: {o.error}" for o in failed))
        for outcome in outcomes.values():
            subject_rows, plan, seconds = outcome.value
            rows.extend(subject_rows)
            records.append(plan)
            log(f"{plan['subject']} ({plan['group']}, {plan['baseline_age']:.1f} y): {len(plan['scans'])} scans in {seconds:.1f}s")
        _write_csv(rows, staging / "cohort.csv")
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


def _write_subject(job) -> tuple[list[dict], dict, float]:
    """Build subject ``index`` and write its files into the staging folder (runs on a worker or here)."""
    index, bank, grid, config, staging = job
    t0 = time.time()
    bank = bank if isinstance(bank, Bank) else load_bank(bank)
    staging = Path(staging)
    plan, scans = make_subject(index, bank, grid, config)
    rows = []
    for scan in scans:
        stem = f"{plan['subject']}_scan-{scan['scan']}"
        paths = {
            "path": f"{plan['subject']}/{stem}_T1w.nii.gz",
            "clean_path": f"{plan['subject']}/{stem}_clean.nii.gz",
            "labels_path": f"{plan['subject']}/{stem}_labels.nii.gz",
            "mask_path": f"{plan['subject']}/{stem}_mask.nii.gz",
        }
        _write(np.round(scan["image"]).clip(0, 32767), grid, staging / paths["path"], sitk.sitkInt16)
        _write(np.round(scan["clean"]).clip(0, 32767), grid, staging / paths["clean_path"], sitk.sitkInt16)
        _write(scan["labels"], grid, staging / paths["labels_path"], sitk.sitkUInt8)
        _write(scan["mask"], grid, staging / paths["mask_path"], sitk.sitkUInt8)
        rows.append({"subject": plan["subject"], "scan": scan["scan"], "age": f"{scan['age']:.1f}",
                     "group": plan["group"],
                     "transition_age": "" if plan["transition_age"] is None else f"{plan['transition_age']:.1f}",
                     **paths})
        plan.setdefault("scans", []).append({
            "scan": scan["scan"], "age": scan["age"], "min_jacobian": round(scan["min_jacobian"], 4),
            "volumes_ml": {k: round(v, 3) for k, v in scan["volumes_ml"].items()},
            "log_volume_change_goal": {k: round(v, 5) for k, v in scan["goals"].items()},
            "log_volume_change_achieved": {k: round(v, 5) for k, v in scan["achieved"].items()},
        })
    return rows, plan, time.time() - t0


def _write(array: np.ndarray, grid: fields.Grid, path: Path, pixel_type) -> None:
    image = grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    io.write_image(sitk.Cast(image, pixel_type), path)


def _write_csv(rows: list[dict], path: Path) -> None:
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COHORT_COLUMNS, lineterminator="\n")
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
            for key in ("path", "labels_path", "mask_path", "clean_path"):
                row[key] = str(folder / row[key])
            rows.append(row)
    return rows
