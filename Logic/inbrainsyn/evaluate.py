"""``inbrainsyn evaluate``: every method against the true follow-ups of a phantom cohort.

Methods compared (all predict the follow-up at age T from the baseline at age A, as one deformation
``phi`` of the baseline on its own grid; the prediction is ``baseline o phi``):

* ``oracle``: ``phi`` = the true baseline -> follow-up map (the ceiling of any warp of the baseline);
* ``oracle-cohort``: the phantom's ``subject``-truth atrophy solve on the subject's true partial-volume
  maps with the cohort's *mean* rates (rate multipliers 1, same group and conversion age): the ceiling
  of any method that knows only the cohort and the age (the subject's own pace is unknowable);
* ``oracle-conjugation``: the template's ageing ``exp(u)`` conjugated by the *true* map ``phi_s`` from
  the subject onto the template at the baseline age (the phantom's template -> subject map composed
  with the bank's step between the listed and the baseline age), ``phi_s^-1 o exp(u) o phi_s``: full
  conjugation with a perfect registration, the ceiling of carrying the template's ageing into the subject;
* ``pole``, ``schild``, ``conjugation``, ``half-conjugation``: InBrainSyn with that transport;
* ``untransported``: the template ageing ``u`` applied to the subject as is (``w = u``);
* ``template``: the reference code's baseline, the subject registered onto the target-age template
  (``S o exp(v') ~ T(T)``) and the warped subject returned;
* ``copy``: the baseline itself (``phi`` = identity).

Each subject's baseline goes through the pipeline's own registration (``synthesis.register_subject``:
affine, then SVF); subjects marked ``input = head`` in the phantom give the scan *with skull* and
run as a user's scan does (``skull_stripped=False``: affine on the head, registration restricted to
the template's dilated brain mask), the others give the skull-stripped scan.

Scores per (subject, follow-up, truth, method) -- see docs/evaluation.md:

* image: against the **clean** (noise-free) true follow-up, inside its brain mask, each image mapped
  to [0, 1] by its own 1st-99th percentiles there: PSNR (data range 1), SSIM (3D, Gaussian window
  sigma 1.5 voxel), MAE; Dice of the subject's baseline labels carried by ``phi`` (nearest) against
  the true follow-up labels;
* geometry: endpoint error ``|phi - phi_true|`` (mm) inside the baseline brain, mean and 95th
  percentile; per summary region (hippocampus, amygdala, ventricles, GM, WM, whole brain) the
  predicted log-volume change ``log(sum(M o phi) / sum(M))`` of the baseline's one-hot maps ``M``
  (trilinear) minus the true one (the same measure with ``phi_true``).

Summaries: mean +- SD per method and truth; paired differences of each method against
``untransported`` and ``copy`` with 95 % bootstrap intervals over *subjects* (follow-ups of one
subject are not independent); the share of the copy-to-oracle PSNR gap each method closes (with
its interval); all of it again per tertile of the subject's distance from the template (RMS of the
non-affine part of the template -> subject map, from phantom.json) and per input (head / stripped).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from inbrainsyn import fields, io
from inbrainsyn.errors import InputError, ProcessingError
from inbrainsyn.progress import Reporter

METHODS = ("oracle", "oracle-cohort", "oracle-conjugation", "pole", "schild", "conjugation", "half-conjugation",
           "untransported", "template", "copy")
# methods that rebuild the phantom subject's true anatomy (phantom.subject_anatomy) from phantom.json
REBUILT = ("oracle-cohort", "oracle-conjugation")
# the ceilings the copy-to-oracle gap is decomposed by (see docs/evaluation.md)
CEILINGS = ("oracle", "oracle-cohort", "oracle-conjugation")
TRANSPORTS = ("pole", "schild", "conjugation", "half-conjugation")
IMAGE_METRICS = ("psnr", "ssim", "mae", "dice")
REGIONS = ("hippocampus", "amygdala", "ventricles", "gm", "wm", "whole_brain")
GEOMETRY_METRICS = ("epe_mm", "epe95_mm") + tuple(f"dlv_{r}" for r in REGIONS)
METRICS = IMAGE_METRICS + GEOMETRY_METRICS + ("dlv_mean",)
BOOTSTRAP = 2000


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def unit_range(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Map the 1st/99th percentiles inside ``mask`` to 0/1 and clip to [0, 1]."""
    lo, hi = np.percentile(array[mask], [1, 99])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def psnr(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    mse = float(np.mean((pred[mask] - truth[mask]) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, sigma: float = 1.5) -> float:
    """Mean 3D SSIM (Wang et al. 2004; Gaussian window, data range 1) over ``mask``."""
    c1, c2 = 0.01**2, 0.03**2
    mu_p, mu_t = gaussian_filter(pred, sigma), gaussian_filter(truth, sigma)
    var_p = gaussian_filter(pred * pred, sigma) - mu_p**2
    var_t = gaussian_filter(truth * truth, sigma) - mu_t**2
    cov = gaussian_filter(pred * truth, sigma) - mu_p * mu_t
    score = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return float(score[mask].mean())


def mean_dice(pred_labels: np.ndarray, true_labels: np.ndarray, labels) -> float:
    scores = []
    for label in labels:
        p, t = pred_labels == label, true_labels == label
        total = p.sum() + t.sum()
        if t.sum() > 0:
            scores.append(2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores)) if scores else float("nan")


def image_metrics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, pred_labels: np.ndarray,
                  true_labels: np.ndarray, labels) -> dict:
    """PSNR, SSIM, MAE (each image mapped to [0, 1] inside ``mask``) and mean Dice."""
    m = mask > 0
    p = unit_range(pred.astype(np.float64), m)
    t = unit_range(truth.astype(np.float64), m)
    return {
        "psnr": psnr(p, t, m),
        "ssim": ssim(p, t, m),
        "mae": float(np.mean(np.abs(p[m] - t[m]))),
        "dice": mean_dice(pred_labels, true_labels, labels),
    }


def endpoint_error(pred_mm: np.ndarray, true_mm: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile of ``|pred - true|`` (mm) over ``mask``; fields ``(Z, Y, X, 3)`` mm."""
    error = np.sqrt(((pred_mm[mask] - true_mm[mask]) ** 2).sum(-1))
    return float(error.mean()), float(np.percentile(error, 95))


def regional_log_changes(maps: torch.Tensor, region_members: dict[str, list[int]], displacement: torch.Tensor | None) -> dict:
    """``log(sum(M o phi) / sum(M))`` per summary region; ``maps`` is ``{label: (Z, Y, X)}`` stacked
    ``(L, Z, Y, X)`` in the order of ``region_members``' label indices; ``displacement`` voxel units."""
    before = maps.sum(dim=(1, 2, 3)).double()
    after = before if displacement is None else fields.warp(maps, displacement).sum(dim=(1, 2, 3)).double()
    out = {}
    for region, members in region_members.items():
        b, a = float(before[members].sum()), float(after[members].sum())
        out[region] = math.log(a / b) if b > 0 and a > 0 else float("nan")
    return out


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    subject: str
    age: float
    group: str
    transition_age: float | None
    image: Path  # what the evaluation feeds the pipeline (head or skull-stripped)
    labels: Path
    mask: Path
    clean: Path
    input: str = "stripped"


@dataclass
class Truth:
    subject: str
    age: float
    truth: str
    clean: Path
    labels: Path
    mask: Path
    field: Path


def read_cohort(folder: Path) -> dict[str, list[Scan]]:
    """Scans of a phantom cohort (``cohort.csv``) grouped by subject, sorted by age."""
    csv_path = Path(folder) / "cohort.csv"
    if not csv_path.exists():
        raise InputError(f"{csv_path}: not found; make a phantom cohort with `inbrainsyn phantom -o {folder}`")
    subjects: dict[str, list[Scan]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            transition = row.get("transition_age") or ""
            kind = row.get("input") or "stripped"
            image = row["head_path"] if kind == "head" and row.get("head_path") else row["path"]
            scan = Scan(
                subject=row["subject"], age=float(row["age"]), group=row["group"],
                transition_age=float(transition) if transition not in ("", "nan", "None") else None,
                image=Path(folder) / image, labels=Path(folder) / row["labels_path"],
                mask=Path(folder) / row["mask_path"], clean=Path(folder) / row["clean_path"], input=kind,
            )
            subjects.setdefault(scan.subject, []).append(scan)
    return {k: sorted(v, key=lambda s: s.age) for k, v in sorted(subjects.items())}


def read_truths(folder: Path) -> dict[str, list[Truth]]:
    """True follow-ups (``truths.csv``) per subject; raises when the phantom predates them."""
    path = Path(folder) / "truths.csv"
    if not path.exists():
        raise InputError(f"{path}: not found; this phantom predates true deformations and clean truths: "
                         "make it again with `inbrainsyn phantom`")
    out: dict[str, list[Truth]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            truth = Truth(subject=row["subject"], age=float(row["age"]), truth=row["truth"],
                          clean=Path(folder) / row["clean_path"], labels=Path(folder) / row["labels_path"],
                          mask=Path(folder) / row["mask_path"], field=Path(folder) / row["field_path"])
            out.setdefault(truth.subject, []).append(truth)
    return out


def phantom_settings(folder: Path) -> dict | None:
    """``{"config": ..., "bank": ...}`` of a phantom (phantom.json), or None when it has none."""
    path = Path(folder) / "phantom.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if "config" not in info:
        return None
    return {"config": info["config"], "bank": info.get("bank")}


def conjugate_by_map(ageing: torch.Tensor, phi: torch.Tensor, iterations: int = 8) -> tuple[torch.Tensor, float]:
    """Displacement of ``phi^-1 o E o phi`` (``E = id + ageing``), all ``(3, Z, Y, X)`` voxel units.

    ``M`` solves ``phi o M = E o phi``, i.e. ``M + phi_d(x + M) = c`` with ``c`` the displacement of
    ``E o phi``, by Newton steps with the Jacobian of ``phi`` at ``x`` (``M`` is small: a few years of
    ageing).  Returns ``(M, largest residual in voxels)``.
    """
    target = fields.compose(ageing, phi)
    jac = fields.jacobian_matrix(phi).permute(2, 3, 4, 0, 1).double()  # (Z, Y, X, 3, 3)
    inverse = torch.linalg.inv(jac).float()
    del jac

    def step(residual):
        return torch.einsum("zyxij,jzyx->izyx", inverse, residual)

    m = step(target - phi)
    for _ in range(iterations):
        m = m + step(target - fields.compose(phi, m))
    residual = float((target - fields.compose(phi, m)).norm(dim=0).max())
    return m, residual


def listed_to_age_svf(bank, cohort: str, listed_age: float, age: float) -> torch.Tensor:
    """SVF ``o`` on the bank grid with ``template(listed_age) = template(age) o exp(o)``.

    ``template(age)`` between listed ages is the lower listed template warped by the bank's step SVF
    (:meth:`Bank.template_tensor`), so for the lower listed age ``o = -step(age)`` and for the upper one
    ``o = step(upper) - step(age)`` (the listed upper template taken as the end of the step).
    """
    lower, upper, _ = bank._bracket(cohort, age)
    if upper is None or abs(listed_age - age) < 1e-6:
        return torch.zeros((3, *bank.grid.shape))
    step = bank._step_svf(cohort, lower, upper, age)
    if step is None:
        raise InputError(f"bank '{bank.name}' interpolates {cohort} templates without an SVF; drop oracle-conjugation")
    if abs(listed_age - lower.age) < 1e-6:
        return -step
    if abs(listed_age - upper.age) < 1e-6:
        return bank._step_svf(cohort, lower, upper, upper.age) - step
    raise InputError(f"listed age {listed_age:g} does not bracket age {age:g} in bank '{bank.name}'")


def rebuild_anatomy(subject: str, settings: dict, bank, grid: fields.Grid, labels: np.ndarray, max_mismatch=1e-3):
    """The phantom subject's anatomy (:func:`inbrainsyn.phantom.subject_anatomy`) rebuilt from its seed.

    Raises InputError when the rebuilt labels differ from the written ones in more than ``max_mismatch``
    of the brain's voxels (a phantom written by other code or with another bank).
    """
    from inbrainsyn import phantom
    from inbrainsyn.templates.regions import argmax_labels

    if settings is None:
        raise InputError(f"{subject}: the phantom has no phantom.json config; drop the methods {', '.join(REBUILT)}")
    if settings.get("bank") and settings["bank"] != bank.name:
        raise InputError(f"{subject}: the phantom was made with bank {settings['bank']!r}, the evaluation uses "
                         f"{bank.name!r}; pass --bank or drop the methods {', '.join(REBUILT)}")
    config = phantom.config_from_json(settings["config"])
    index = int(subject.rsplit("-", 1)[-1])
    built_grid = phantom.subject_grid(bank, config.spacing, config.pad_mm)
    if tuple(built_grid.size) != tuple(grid.size):
        raise InputError(f"{subject}: the phantom's grid {tuple(grid.size)} is not the one its config rebuilds "
                         f"{tuple(built_grid.size)}; drop the methods {', '.join(REBUILT)}")
    anatomy = phantom.subject_anatomy(index, bank, built_grid, config)
    rebuilt = argmax_labels(anatomy.subject_maps, anatomy.values).numpy()
    brain = (labels > 0) | (rebuilt > 0)
    mismatch = float(np.mean(rebuilt[brain] != labels[brain]))
    if mismatch > max_mismatch:
        raise InputError(f"{subject}: the anatomy rebuilt from the phantom's seed differs from its written labels in "
                         f"{100 * mismatch:.2f} % of the brain (phantom made by other code?); drop the methods "
                         f"{', '.join(REBUILT)}")
    return anatomy, config, mismatch


def subject_distances(folder: Path) -> dict[str, dict]:
    """Per subject: distance from the template and anatomy summary (phantom.json ``anatomy``)."""
    path = Path(folder) / "phantom.json"
    if not path.exists():
        return {}
    info = json.loads(path.read_text())
    out = {}
    for s in info.get("subjects", []):
        anatomy = s.get("anatomy", {})
        out[s["subject"]] = {
            "distance_mm": anatomy.get("nonlinear_displacement", {}).get("rms_mm", float("nan")),
            "ventricle_ratio": anatomy.get("volume_ratio_to_template", {}).get("ventricles", float("nan")),
        }
    return out


# ------------------------------------------------------------------------------------------------
# One subject (a plain function of plain arguments: it can be mapped over processes or a cluster)
# ------------------------------------------------------------------------------------------------


def evaluate_subject(scans: list[Scan], truths: list[Truth], bank, device="cpu", methods=METHODS,
                     truth_kinds=None, extra: dict | None = None, settings: dict | None = None) -> list[dict]:
    """Predict every follow-up of one subject with every method and score it against every truth.

    Returns one row per (follow-up, truth, method).  ``bank`` is a Bank or a bank path (None = shipped).
    ``settings`` (:func:`phantom_settings`) is needed by the methods in :data:`REBUILT`.
    """
    from inbrainsyn.native import NativeMapper, resample_native
    from inbrainsyn.registration import register_svf
    from inbrainsyn.synthesis import SynthesisRequest, cohort_ageing_svf, register_subject, transport_on_coarse_grid
    from inbrainsyn.templates import load_bank
    from inbrainsyn.templates.regions import one_hot, summary_label_values

    if bank is None or isinstance(bank, (str, Path)):
        bank = load_bank(bank)
    device = fields.resolve_device(device) if isinstance(device, str) else device
    started_subject = time.perf_counter()
    baseline, follow_ups = scans[0], scans[1:]
    cohort = "HC" if baseline.group.upper().startswith("HC") else "AD"
    transition = baseline.transition_age if cohort == "HC" else None
    subject = io.read_image(baseline.image)
    grid = fields.Grid.from_sitk(subject)
    request = SynthesisRequest(
        input_path=str(baseline.image), age=baseline.age, targets=[s.age for s in follow_ups], cohort=cohort,
        transition_age=transition, skull_stripped=baseline.input != "head",
        affine_threads=1,  # one ITK thread: bit-identical results for a seed, in this process or on a worker
    )
    t0 = time.perf_counter()
    registered = register_subject(subject, request, bank, device, Reporter())
    registration_s = time.perf_counter() - t0
    mapper = NativeMapper(grid, bank.grid, registered.affine_matrix, registered.affine_offset, device)
    array = sitk.GetArrayViewFromImage(subject)
    low, high = float(array.min()), float(array.max())
    label_ids = sorted(int(k) for k in bank.label_names if int(k) != 0)
    baseline_labels_image = sitk.Cast(sitk.ReadImage(str(baseline.labels)), sitk.sitkInt16)
    baseline_labels = sitk.GetArrayFromImage(baseline_labels_image)
    brain = baseline_labels > 0
    values = sorted(int(v) for v in bank.label_names)
    maps = one_hot(torch.from_numpy(baseline_labels.astype(np.int64)), values)
    index_of = {v: i for i, v in enumerate(values)}
    members = {r: [index_of[v] for v in vs if v in index_of] for r, vs in summary_label_values(bank.label_names).items()}
    members = {r: members[r] for r in REGIONS}
    anatomy = None
    rebuild_s = 0.0
    if set(REBUILT) & set(methods):
        t0 = time.perf_counter()
        anatomy, phantom_config, mismatch = rebuild_anatomy(baseline.subject, settings, bank, grid, baseline_labels)
        identity = NativeMapper(grid, bank.grid, np.eye(3), np.zeros(3), device)
        # the true template -> subject map for the registration's target, the template at the
        # baseline age: subject = template(listed) o phi = template(age) o exp(o) o phi
        listed = anatomy.plan["anatomy_template"]
        offset = listed_to_age_svf(bank, listed["cohort"], listed["age"], baseline.age)
        offset = fields.field_from_physical(identity.native_map(fields.accurate_exp(offset)), grid)
        true_registration = fields.compose(offset, anatomy.phi)
        rebuild_s = time.perf_counter() - t0
    by_age: dict[float, list[Truth]] = {}
    for t in truths:
        if truth_kinds is None or t.truth in truth_kinds:
            by_age.setdefault(round(t.age, 1), []).append(t)

    rows = []
    for scan in follow_ups:
        scan_truths = by_age.get(round(scan.age, 1), [])
        if not scan_truths:
            raise InputError(f"{scan.subject} at {scan.age:g} y: no true follow-up in truths.csv")
        loaded = []
        for t in scan_truths:
            true_disp, _ = io.read_field(t.field)
            loaded.append({
                "truth": t, "disp": true_disp, "mm": fields.field_to_physical(true_disp, grid),
                "clean": sitk.GetArrayFromImage(sitk.ReadImage(str(t.clean))).astype(np.float32),
                "labels": sitk.GetArrayFromImage(sitk.ReadImage(str(t.labels))),
                "mask": sitk.GetArrayFromImage(sitk.ReadImage(str(t.mask))) > 0,
                "dlv": regional_log_changes(maps, members, true_disp),
            })
        u = cohort_ageing_svf(bank, cohort, baseline.age, scan.age, transition).to(device)
        v = registered.velocity.to(device)
        for method in methods:
            started = time.perf_counter()
            native_by_truth = {}
            if method == "oracle":
                native_by_truth = {d["truth"].truth: d["mm"].astype(np.float32) for d in loaded}
            elif method == "oracle-cohort":
                from inbrainsyn import phantom

                solution = phantom.subject_truth_solution(anatomy, bank, phantom_config, scan.age, multipliers={})
                native = fields.field_to_physical(fields.exp(solution.velocity), grid).astype(np.float32)
            elif method == "oracle-conjugation":
                ageing = fields.field_from_physical(identity.native_map(fields.accurate_exp(u).cpu()), grid)
                conjugated, _ = conjugate_by_map(ageing, true_registration)
                native = fields.field_to_physical(conjugated, grid).astype(np.float32)
            elif method == "copy":
                native = np.zeros((*grid.shape, 3), np.float32)
            elif method == "template":
                target_template = fields.image_to_tensor(bank.template(cohort, scan.age))
                result = register_svf(target_template, registered.image, spacing=bank.grid.spacing, device=device)
                native = mapper.native_map(result.displacement.detach().cpu())
            else:
                w = u if method == "untransported" else transport_on_coarse_grid(u, v, method, request.transport_coarsening)
                native = mapper.native_map(fields.accurate_exp(w).cpu())
            cache = {}
            for d in loaded:
                kind = d["truth"].truth
                phi = native_by_truth.get(kind, native if method != "oracle" else None)
                key = id(phi)
                if key not in cache:
                    if method == "copy":
                        pred = sitk.GetArrayFromImage(subject).astype(np.float32)
                        pred_labels = baseline_labels
                        dlv = {r: 0.0 for r in REGIONS}
                    else:
                        pred_img = sitk.Clamp(resample_native(subject, phi, sitk.sitkBSpline), sitk.sitkFloat32, low, high)
                        pred = sitk.GetArrayFromImage(pred_img)
                        pred_labels = sitk.GetArrayFromImage(resample_native(baseline_labels_image, phi, sitk.sitkNearestNeighbor))
                        dlv = regional_log_changes(maps, members, fields.field_from_physical(phi, grid))
                    cache[key] = (pred, pred_labels, dlv)
                pred, pred_labels, dlv = cache[key]
                scores = image_metrics(pred, d["clean"], d["mask"], pred_labels, d["labels"], label_ids)
                epe, epe95 = endpoint_error(phi, d["mm"], brain)
                errors = {f"dlv_{r}": dlv[r] - d["dlv"][r] for r in REGIONS}
                rows.append({
                    "subject": baseline.subject, "group": baseline.group, "input": baseline.input,
                    "baseline_age": baseline.age, "age": scan.age, "years": round(scan.age - baseline.age, 1),
                    "truth": kind, "method": method, **scores, "epe_mm": epe, "epe95_mm": epe95, **errors,
                    "dlv_mean": float(np.mean([abs(e) for e in errors.values()])),
                    **{f"true_dlv_{r}": d["dlv"][r] for r in REGIONS},
                    **(extra or {}),
                    "registration_s": registration_s, "rebuild_s": rebuild_s, "seconds": time.perf_counter() - started,
                })
    for row in rows:
        row["subject_s"] = time.perf_counter() - started_subject
    return rows


def _evaluate_subject_job(args: tuple) -> list[dict]:
    """Cohort-engine entry (one subject on a worker): one thread per worker."""
    torch.set_num_threads(1)
    return evaluate_subject(*args)


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------


def _by(rows, **keys):
    return [r for r in rows if all(r[k] == v for k, v in keys.items())]


def summarise(rows: list[dict], methods=METHODS) -> list[dict]:
    """Mean and SD of each metric per (truth, method); |errors| for the volume changes."""
    summary = []
    truths = sorted({r.get("truth", "subject") for r in rows}, key=lambda t: (t != "subject", t))
    for truth in truths:
        for method in methods:
            chosen = [r for r in rows if r["method"] == method and r.get("truth", "subject") == truth]
            if not chosen:
                continue
            entry = {"truth": truth, "method": method, "n": len(chosen), "subjects": len({r["subject"] for r in chosen})}
            for metric in METRICS:
                if metric not in chosen[0]:
                    continue
                values = np.asarray([r[metric] for r in chosen], dtype=np.float64)
                if metric.startswith("dlv_") and metric != "dlv_mean":
                    values = np.abs(values)
                entry[metric] = float(np.nanmean(values))
                entry[f"{metric}_sd"] = float(np.nanstd(values))
            summary.append(entry)
    return summary


def _metric_value(row: dict, metric: str) -> float:
    value = float(row[metric])
    return abs(value) if metric.startswith("dlv_") else value


def paired_differences(rows: list[dict], method: str, reference: str, metric: str, truth: str,
                       seed: int = 0, resamples: int = BOOTSTRAP) -> dict | None:
    """Mean paired difference ``method - reference`` over follow-ups, 95 % bootstrap CI over subjects."""
    a = {(r["subject"], r["age"]): _metric_value(r, metric) for r in _by(rows, method=method, truth=truth)}
    b = {(r["subject"], r["age"]): _metric_value(r, metric) for r in _by(rows, method=reference, truth=truth)}
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    subjects = sorted({k[0] for k in keys})
    per_subject = np.array([[sum(a[k] - b[k] for k in keys if k[0] == s), sum(1 for k in keys if k[0] == s)]
                            for s in subjects], dtype=np.float64)
    mean = per_subject[:, 0].sum() / per_subject[:, 1].sum()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(subjects), size=(resamples, len(subjects)))
    sums = per_subject[picks].sum(axis=1)
    boot = sums[:, 0] / sums[:, 1]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"method": method, "reference": reference, "metric": metric, "truth": truth, "mean": float(mean),
            "lo": float(lo), "hi": float(hi), "n": len(keys), "subjects": len(subjects)}


def gap_closed(rows: list[dict], method: str, truth: str, metric: str = "psnr", seed: int = 0,
               resamples: int = BOOTSTRAP, ceiling: str = "oracle", lower: str = "copy") -> dict | None:
    """Share of the copy-to-``ceiling`` gap closed: ``(m - lower) / (ceiling - copy)`` of the means, CI over subjects.

    With the defaults, ``(m - copy) / (oracle - copy)``; ``lower`` other than ``copy`` gives the share of
    the copy-to-ceiling gap lying between ``lower`` and ``method`` (a part of the gap's decomposition).
    """
    names = (method, lower, ceiling, "copy")
    if any(not _by(rows, method=m, truth=truth) for m in names):
        return None
    tables = {m: {(r["subject"], r["age"]): _metric_value(r, metric) for r in _by(rows, method=m, truth=truth)}
              for m in names}
    keys = sorted(set.intersection(*(set(t) for t in tables.values())))
    if not keys:
        return None
    subjects = sorted({k[0] for k in keys})
    per = np.array([[sum(tables[m][k] for k in keys if k[0] == s) for m in names]
                    for s in subjects], dtype=np.float64)

    def share(sums):
        return (sums[..., 0] - sums[..., 1]) / (sums[..., 2] - sums[..., 3])

    value = float(share(per.sum(axis=0)))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(subjects), size=(resamples, len(subjects)))
    boot = share(per[picks].sum(axis=1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"method": method, "truth": truth, "metric": metric, "share": value, "lo": float(lo), "hi": float(hi),
            "n": len(keys), "subjects": len(subjects), "ceiling": ceiling, "lower": lower}


# The copy-to-oracle gap, from the top: what no method given only cohort and age can know, what
# carrying the template's ageing exactly cannot express, what the registration loses, and what the
# pole ladder (conjugation by the half-way map) loses against full conjugation.
GAP_PARTS = (
    ("individual pace (unknowable)", "oracle", "oracle-cohort"),
    ("template ageing vs ageing of the subject's own regions", "oracle-cohort", "oracle-conjugation"),
    ("registration (conjugation with the estimated map)", "oracle-conjugation", "conjugation"),
    ("pole ladder vs full conjugation", "conjugation", "pole"),
    ("pole's gain over copy", "pole", "copy"),
)


def add_strata(rows: list[dict]) -> list[str]:
    """Label each row with the tertile of its subject's distance from the template; returns the labels."""
    distances = sorted({(r["subject"], r.get("distance_mm", float("nan"))) for r in rows}, key=lambda x: x[1])
    values = np.array([d for _, d in distances if np.isfinite(d)])
    if values.size < 3:
        for r in rows:
            r["stratum"] = "all"
        return ["all"]
    cuts = np.percentile(values, [100 / 3, 200 / 3])
    names = [f"near (<{cuts[0]:.1f} mm)", f"mid ({cuts[0]:.1f}-{cuts[1]:.1f} mm)", f"far (>{cuts[1]:.1f} mm)"]
    for r in rows:
        d = r.get("distance_mm", float("nan"))
        r["stratum"] = names[int(np.searchsorted(cuts, d))] if np.isfinite(d) else "unknown"
    return names


def _fmt(x: float, digits: int) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.{digits}f}"


def markdown_report(rows: list[dict], methods=METHODS, seed: int = 0) -> tuple[str, dict]:
    """The tables of docs/evaluation.md (markdown) and the same numbers as a dict."""
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    truths = sorted({r["truth"] for r in rows}, key=lambda t: (t != "subject", t))
    summary = summarise(rows, present)
    out = {"summary": summary, "paired": [], "gap": [], "strata": []}
    lines = []
    subjects = len({r["subject"] for r in rows})
    follow = len({(r["subject"], r["age"]) for r in rows})
    lines.append(f"{subjects} subjects, {follow} follow-ups; mean ± SD over follow-ups.\n")
    for truth in truths:
        lines += [f"### Truth `{truth}`: image and geometry", "",
                  "| Method | PSNR (dB) | SSIM | MAE | Dice | EPE (mm) | EPE p95 (mm) | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in (e for e in summary if e["truth"] == truth):
            lines.append(f"| {e['method']} | {e['psnr']:.2f} ± {e['psnr_sd']:.2f} | {e['ssim']:.4f} | {e['mae']:.4f} | "
                         f"{e['dice']:.4f} | {e['epe_mm']:.2f} ± {e['epe_mm_sd']:.2f} | {e['epe95_mm']:.2f} | {e['n']} |")
        lines += ["", f"Absolute error of the predicted regional log-volume change (x100, ~percentage points), truth `{truth}`:", "",
                  "| Method | " + " | ".join(REGIONS) + " | mean |", "|---|" + "---|" * (len(REGIONS) + 1)]
        for e in (e for e in summary if e["truth"] == truth):
            lines.append(f"| {e['method']} | " + " | ".join(f"{100 * e[f'dlv_{r}']:.2f}" for r in REGIONS)
                         + f" | {100 * e['dlv_mean']:.2f} |")
        true_mean = {r: 100 * float(np.mean([row[f"true_dlv_{r}"] for row in _by(rows, truth=truth, method=present[0])]))
                     for r in REGIONS}
        lines.append("| *(true change, mean)* | " + " | ".join(f"{true_mean[r]:+.2f}" for r in REGIONS) + " | |")
        lines += ["", f"Paired differences (method − reference; mean over follow-ups, 95 % bootstrap CI over subjects), truth `{truth}`."
                  " PSNR: higher is better; EPE and |Δlog V| error: lower is better.", "",
                  "| Method | vs | ΔPSNR (dB) | ΔEPE (mm) | Δ mean abs vol-change error (x100) |", "|---|---|---|---|---|"]
        for method in [m for m in present if m in TRANSPORTS + ("template",)]:
            for reference in ("untransported", "copy"):
                if reference not in present:
                    continue
                cells = []
                for metric, scale, digits in (("psnr", 1, 3), ("epe_mm", 1, 3), ("dlv_mean", 100, 3)):
                    p = paired_differences(rows, method, reference, metric, truth, seed)
                    out["paired"].append(p)
                    cells.append(f"{scale * p['mean']:+.{digits}f} [{scale * p['lo']:+.{digits}f}, {scale * p['hi']:+.{digits}f}]")
                lines.append(f"| {method} | {reference} | " + " | ".join(cells) + " |")
        if "oracle" in present and "copy" in present:
            ceilings = [c for c in CEILINGS if c in present]
            lines += ["", f"Share of the copy-to-ceiling PSNR gap closed, truth `{truth}` (95 % bootstrap CI over subjects):"
                      " `oracle` is the true follow-up's map; `oracle-cohort` knows the subject's true anatomy but"
                      " only the cohort's mean rates; `oracle-conjugation` carries the template's ageing with the"
                      " true template -> subject map.", "",
                      "| Method | " + " | ".join(f"of copy → {c}" for c in ceilings) + " |", "|---|" + "---|" * len(ceilings)]
            for method in [m for m in present if m != "copy"]:
                cells = []
                for c in ceilings:
                    g = gap_closed(rows, method, truth, seed=seed, ceiling=c) if method != c else None
                    if g is None:
                        cells.append("")
                        continue
                    if c == "oracle":
                        out["gap"].append(g)
                    else:
                        out.setdefault("gap_ceilings", []).append(g)
                    cells.append(f"{100 * g['share']:.1f} % [{100 * g['lo']:.1f}, {100 * g['hi']:.1f}]")
                if method != "oracle":
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
            parts = [part for part in GAP_PARTS if part[1] in present and part[2] in present]
            if len(parts) > 1:
                lines += ["", f"Decomposition of the copy-to-oracle gap, truth `{truth}`: each part is the paired"
                          " difference of two rows (mean over follow-ups, 95 % bootstrap CI over subjects) and its share"
                          " of the oracle − copy PSNR gap; EPE and volume-change error: lower row − upper row"
                          " (what the part costs).", "",
                          "| Part | upper − lower | ΔPSNR (dB) | share of gap | ΔEPE (mm) | Δ mean abs vol-change error (x100) |",
                          "|---|---|---|---|---|---|"]
                for label, upper, lower in parts:
                    dp = paired_differences(rows, upper, lower, "psnr", truth, seed)
                    g = gap_closed(rows, upper, truth, seed=seed, lower=lower)
                    de = paired_differences(rows, lower, upper, "epe_mm", truth, seed)
                    dv = paired_differences(rows, lower, upper, "dlv_mean", truth, seed)
                    out.setdefault("decomposition", []).append({"part": label, "upper": upper, "lower": lower, "truth": truth,
                                                               "psnr": dp, "share": g, "epe_mm": de, "dlv_mean": dv})
                    lines.append(f"| {label} | {upper} − {lower} | {dp['mean']:+.3f} [{dp['lo']:+.3f}, {dp['hi']:+.3f}] | "
                                 f"{100 * g['share']:.1f} % [{100 * g['lo']:.1f}, {100 * g['hi']:.1f}] | "
                                 f"{de['mean']:+.3f} [{de['lo']:+.3f}, {de['hi']:+.3f}] | "
                                 f"{100 * dv['mean']:+.3f} [{100 * dv['lo']:+.3f}, {100 * dv['hi']:+.3f}] |")
        lines.append("")
    # strata
    names = add_strata(rows)
    for truth in truths:
        lines += [f"### By distance from the template and by input, truth `{truth}`", "",
                  "Distance = RMS of the non-affine part of the template -> subject map inside the brain (tertiles)."
                  " Cells: PSNR (dB) / EPE (mm) / mean |Δlog V| error (x100).", "",
                  "| Stratum | subjects | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
        groups = [("stratum", n) for n in names] + [("input", k) for k in ("stripped", "head")]
        for key, value in groups:
            chosen = [r for r in rows if r.get(key) == value and r["truth"] == truth]
            if not chosen:
                continue
            cells = []
            for m in present:
                sel = [r for r in chosen if r["method"] == m]
                vals = (np.mean([r["psnr"] for r in sel]), np.mean([r["epe_mm"] for r in sel]),
                        100 * np.mean([r["dlv_mean"] for r in sel]))
                out["strata"].append({"truth": truth, "by": key, "stratum": value, "method": m, "psnr": vals[0],
                                      "epe_mm": vals[1], "dlv_mean": vals[2] / 100, "n": len(sel)})
                cells.append(f"{_fmt(vals[0], 2)} / {_fmt(vals[1], 2)} / {_fmt(vals[2], 2)}")
            label = f"{value}" if key == "stratum" else f"input: {value}"
            lines.append(f"| {label} | {len({r['subject'] for r in chosen})} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n", out


def plot_report(rows: list[dict], numbers: dict, path: Path, methods=METHODS) -> None:
    """One figure: per-region volume-change error by method; copy-to-oracle gap closed by method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in methods if any(r["method"] == m for r in rows) and m != "oracle"]
    # a method far worse than copy (e.g. the No-PT `template` baseline) would squash both panels' scales
    off_scale = sorted({g["method"] for g in numbers["gap"] if g and g["share"] < -0.5})
    present = [m for m in present if m not in off_scale]
    truths = sorted({r["truth"] for r in rows}, key=lambda t: (t != "subject", t))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    width = 0.8 / len(present)
    x = np.arange(len(REGIONS))
    for i, m in enumerate(present):
        sel = _by(rows, method=m, truth="subject")
        means = [100 * np.mean([abs(r[f"dlv_{reg}"]) for r in sel]) for reg in REGIONS]
        ax.bar(x + (i - len(present) / 2 + 0.5) * width, means, width, label=m)
    ax.set_xticks(x, REGIONS)
    ax.set_ylabel("|predicted − true| log-volume change (x100)")
    ax.set_title("Regional volume-change error by method (truth: subject)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    candidates = [m for m in present if m != "copy"]
    for j, truth in enumerate(truths):
        gaps = {g["method"]: g for g in numbers["gap"] if g and g["truth"] == truth}
        ys = np.arange(len(candidates)) + (j - (len(truths) - 1) / 2) * 0.35
        vals = [100 * gaps[m]["share"] if m in gaps else np.nan for m in candidates]
        err = np.array([[100 * (gaps[m]["share"] - gaps[m]["lo"]), 100 * (gaps[m]["hi"] - gaps[m]["share"])]
                        if m in gaps else [np.nan, np.nan] for m in candidates]).T
        ax.barh(ys, vals, 0.33, xerr=err, label=f"truth: {truth}", capsize=2)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.axvline(70, color="r", lw=0.8, ls=":", label="target 70 %")
    ax.set_yticks(np.arange(len(candidates)), candidates)
    ax.set_xlabel("copy-to-oracle PSNR gap closed (%), 95 % CI")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    note = f"; left out, far worse than copy (see the tables): {', '.join(off_scale)}" if off_scale else ""
    fig.suptitle("Phantom evaluation (synthetic ground truth; not comparable with real-data results)" + note)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def write_report_files(stage: Path, rows: list[dict], methods, seed: int) -> dict:
    """``metrics.csv``, ``report.md`` and ``figure.png`` of ``rows`` in ``stage``; returns the report's numbers."""
    report, numbers = markdown_report(rows, methods, seed)
    with io.atomic_path(stage / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    with io.atomic_path(stage / "report.md") as tmp:
        tmp.write_text(report)
    plot_report(rows, numbers, stage / "figure.png", methods)
    return numbers


def run_evaluation(phantom, outdir: Path, bank_path=None, device="auto", subjects: int | None = None,
                   methods=METHODS, overwrite=False, reporter=None, first_subject: int = 0, truths=None,
                   workers: int = 1, seed: int = 0) -> dict:
    """Evaluate every subject of one or several phantom folders; writes metrics.csv, report.md,
    summary.json, figure.png and manifest.json into ``outdir``."""
    from inbrainsyn.templates import load_bank

    folders = [Path(p) for p in (phantom if isinstance(phantom, (list, tuple)) else [phantom])]
    jobs = []
    for folder in folders:
        cohort = read_cohort(folder)
        all_truths = read_truths(folder)
        distances = subject_distances(folder)
        settings = phantom_settings(folder)
        for name, scans in cohort.items():
            if len(scans) >= 2:
                jobs.append((name, scans, all_truths.get(name, []), distances.get(name, {}), settings))
    jobs = sorted(jobs, key=lambda j: j[0])[first_subject:]
    jobs = jobs[:subjects] if subjects is not None else jobs
    if not jobs:
        raise InputError(f"{', '.join(map(str, folders))}: no subjects selected (first subject {first_subject}, count {subjects})")
    if len({j[0] for j in jobs}) != len(jobs):
        raise InputError("the phantom folders share subject names: build chunks with disjoint --first-index")
    bank = load_bank(bank_path)
    dev = fields.resolve_device(device)
    kinds = tuple(truths) if truths else None
    started = time.perf_counter()
    rows: list[dict] = []
    with io.staged_output_dir(outdir, overwrite) as stage:
        args = [(scans, t, bank_path if workers > 1 else bank, str(dev) if workers > 1 else dev, tuple(methods), kinds,
                 {"distance_mm": d.get("distance_mm", float("nan")), "ventricle_ratio": d.get("ventricle_ratio", float("nan"))},
                 settings)
                for _, scans, t, d, settings in jobs]
        if workers > 1:  # the cohort engine (inbrainsyn.parallel): a local Dask cluster, one subject per worker
            from inbrainsyn import parallel

            items = {name: a for (name, *_), a in zip(jobs, args)}
            options = parallel.ClusterOptions(workers=workers, threads_per_worker=1, device="cpu")
            outcomes = parallel.map_subjects(_evaluate_subject_job, items, options)
            failed = [o for o in outcomes.values() if o.status != "ok"]
            if failed:
                raise ProcessingError("evaluation failed for " + "; ".join(f"{o.key}: {o.error}" for o in failed))
            for i, name in enumerate(items):
                rows.extend(outcomes[name].value)
                if reporter:
                    reporter.progress("evaluate", (i + 1) / len(jobs), f"subject {name}")
        else:
            for i, a in enumerate(args):
                if reporter:
                    reporter.progress("evaluate", i / len(jobs), f"subject {jobs[i][0]}")
                rows.extend(evaluate_subject(*a))
        numbers = write_report_files(stage, rows, methods, seed)
        result = {"subjects": len(jobs), "follow_ups": len({(r["subject"], r["age"]) for r in rows}),
                  "seconds": round(time.perf_counter() - started, 1), **numbers}
        io.write_json({"tool": "inbrainsyn", "command": "evaluate", "phantoms": [str(f.absolute()) for f in folders],
                       "methods": list(methods), "workers": workers, "seed": seed, **result,
                       "outputs": [{"kind": "metrics", "path": "metrics.csv"}, {"kind": "report", "path": "report.md"},
                                   {"kind": "figure", "path": "figure.png"}]}, stage / "manifest.json")
    return result


def read_metrics(paths) -> list[dict]:
    """Rows of one or several ``metrics.csv`` files (numbers parsed)."""
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key not in ("subject", "group", "input", "truth", "method", "stratum"):
                        try:
                            row[key] = float(value)
                        except (TypeError, ValueError):
                            pass
                rows.append(row)
    return rows


def merge_runs(metric_files, outdir: Path, methods=METHODS, seed: int = 0, overwrite: bool = False) -> dict:
    """One report (report.md, figure.png, metrics.csv, manifest.json) from several runs' metrics.csv
    (e.g. phantom chunks evaluated in parallel); the subjects must differ between the runs."""
    rows = read_metrics(metric_files)
    if not rows:
        raise InputError("no rows in the given metrics files")
    keys = [(r["subject"], r["age"], r["truth"], r["method"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise InputError("the metrics files overlap (the same subject, age, truth and method twice)")
    present = tuple(m for m in methods if any(r["method"] == m for r in rows))
    with io.staged_output_dir(outdir, overwrite) as stage:
        numbers = write_report_files(stage, rows, present, seed)
        result = {"subjects": len({r["subject"] for r in rows}), "follow_ups": len({(r["subject"], r["age"]) for r in rows}),
                  **numbers}
        io.write_json({"tool": "inbrainsyn", "command": "evaluate-merge", "inputs": [str(Path(p).absolute()) for p in metric_files],
                       "methods": list(present), "seed": seed, **result}, stage / "manifest.json")
    return result
