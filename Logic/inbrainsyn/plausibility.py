"""Is this input what the method needs?  Checks run after registration, before any output is written.

A valid image can still be the wrong input: a T2, FLAIR or PD scan (the template is T1-weighted),
a scan that holds only part of the brain, a header with wrong voxel sizes, a scan that is not a
brain at all.  Each check measures one number on the registered subject, compares it with a
threshold measured on real scans (docs/reliability.md gives the measurements and the command that
reproduces them) and, when it fails, says what is wrong and what to do.

* ``coverage``  -- fraction of the template's brain that the affine puts inside the input's field of
  view (a cropped scan; measured right after the affine, before the slow SVF registration);
* ``contrast``  -- T1 ordering white matter > grey matter > CSF inside the registered brain, as
  margins in units of the brain's robust intensity range;
* ``volumes``   -- intracranial and brain volume in mL plausible for an adult (wrong voxel size in
  the header, a child, a non-human scan);
* ``fit``       -- template-to-subject local correlation after registration (no brain found).

:func:`enforce` stops the run with :class:`ImplausibleInputError` (exit code 6) listing every failed
check, unless the user passed ``--force-input``: then the run goes on, each failure is logged as a
warning, and :func:`manifest_entry` / :func:`report_note` mark the outputs as run against the checks.

Everything here works on plain arrays/tensors and numbers, so each check is unit-testable on
synthetic data.  This module sits beside ``synthesis`` (it reads registration results, writes nothing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.errors import ImplausibleInputError

# ---- thresholds (measured; see docs/reliability.md "How the thresholds were set") -------------------
# Coverage (MNI152 cut below, affine only): whole head 0.9999; top 85 % of the head 0.968; top 75 %
# 0.898 with hippocampus and amygdala still wholly inside; top 70 % 0.843 with 6 % of the amygdala
# outside; top 45 % 0.459.  The threshold sits where the reported deep regions start to leave the FOV.
MIN_COVERAGE = 0.88
# Contrast margins in units of the brain's 5-95 % intensity range.  Real T1 scans: WM-GM >= 0.16,
# GM-CSF >= 0.30; T2/FLAIR/PD-like remaps: WM-GM <= -0.08.  The thresholds sit in the gap.
MIN_WM_GM_MARGIN = 0.04
MIN_GM_CSF_MARGIN = 0.08
# Adult volumes relative to the bank template's own: intracranial (every template label: tissue + CSF)
# and brain tissue (GM + WM), as the registered template measures them.  The template's labels are
# generous (with the 2 mm CSF shell of the first bank MNI152 measured ICV 2070 / brain 1701 mL), so the
# adult ranges of the literature (ICV ~1050-1950, brain ~850-1600 mL) were scaled by the template's
# inflation (~1.12 ICV, ~1.2 brain) and widened by 10 %: ICV 1050-2400, brain 800-2100 mL for that bank.
# Kept as ratios to the template's own volumes, so that a bank whose labels define the intracranial
# space differently (the regional bank adds a 5 mm CSF shell: ICV 2337 mL) keeps the same decisions.
ICV_RATIO_RANGE = (1050.0 / 2070.0, 2400.0 / 2070.0)
BRAIN_RATIO_RANGE = (800.0 / 1701.0, 2100.0 / 1701.0)
# Fit: local correlation of template and subject after registration (below: no brain found).
MIN_FIT_SIMILARITY = 0.25

FORCE_HINT = "If you are sure the input is right, pass --force-input (outputs are then marked as run against the checks)."


@dataclass
class CheckResult:
    """One check: its measured value(s), the threshold, pass/fail and the message for the user."""

    name: str
    passed: bool
    value: dict
    threshold: dict
    message: str = ""  # what is wrong and what to do (empty when passed)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Coverage of the field of view
# ------------------------------------------------------------------------------------------------


def brain_coverage(input_grid: fields.Grid, mask_grid: fields.Grid, mask: np.ndarray,
                   matrix: np.ndarray, offset: np.ndarray) -> float:
    """Fraction of the template brain ``mask`` ``(Z, Y, X)`` that lies inside the input's field of view.

    ``matrix, offset``: the affine ``A`` (template mm -> input mm).  A template voxel counts as
    covered when ``A`` maps its centre inside the input's voxel grid (half a voxel beyond the outer
    voxel centres).
    """
    zyx = np.argwhere(np.asarray(mask) > 0.5)
    if len(zyx) == 0:
        return 0.0
    index = zyx[:, ::-1].astype(np.float64).T  # (3, N) as (x, y, z)
    template_mm = mask_grid.index_to_physical @ index + np.asarray(mask_grid.origin)[:, None]
    input_mm = np.asarray(matrix) @ template_mm + np.asarray(offset)[:, None]
    input_index = np.linalg.inv(input_grid.index_to_physical) @ (input_mm - np.asarray(input_grid.origin)[:, None])
    size = np.asarray(input_grid.size, dtype=np.float64)[:, None]
    inside = np.all((input_index >= -0.5) & (input_index <= size - 0.5), axis=0)
    return float(inside.mean())


def check_coverage(coverage: float) -> CheckResult:
    passed = coverage >= MIN_COVERAGE
    message = "" if passed else (
        f"brain coverage: only {100 * coverage:.0f}% of the template's brain lies inside the input's field of view "
        f"(needed: {100 * MIN_COVERAGE:.0f}%). The scan seems cropped (e.g. only the top of the head): the "
        "method needs the whole brain, cerebellum included. Give a scan that covers the whole head."
    )
    return CheckResult("coverage", passed, {"fraction": round(coverage, 4)}, {"min_fraction": MIN_COVERAGE}, message)


# ------------------------------------------------------------------------------------------------
# T1 contrast
# ------------------------------------------------------------------------------------------------


def _erode(region: np.ndarray) -> np.ndarray:
    """One-voxel erosion (6-neighbourhood) that never empties a region."""
    r = region
    eroded = r.copy()
    for axis in range(3):
        eroded &= np.roll(r, 1, axis) & np.roll(r, -1, axis)
    return eroded if eroded.sum() >= 20 else region


def tissue_medians(image: np.ndarray, labels: np.ndarray, label_names: dict) -> dict:
    """Median intensity of white matter, cortical grey matter and CSF (lateral ventricles) and the
    brain's 5-95 % intensity range, from the subject ``image`` and the template labels warped onto it
    (both ``(Z, Y, X)`` on one grid).  Deep structures are used where partial volume is least:
    eroded cerebral WM, cortical GM, eroded lateral ventricles."""
    by_name = {str(n): int(v) for v, n in label_names.items()}
    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)

    def region(*names):
        return np.isin(labels, [by_name[n] for n in names if n in by_name])

    wm, gm, csf = _erode(region("cerebral_wm")), region("cortical_gm"), _erode(region("lateral_ventricles"))
    brain = labels > 0
    if min(wm.sum(), gm.sum(), csf.sum()) < 20:
        return {}
    p5, p95 = np.percentile(image[brain], [5, 95])
    return {"wm": float(np.median(image[wm])), "gm": float(np.median(image[gm])), "csf": float(np.median(image[csf])),
            "range": float(max(p95 - p5, 1e-6))}


def contrast_margins(medians: dict) -> dict:
    """``(WM - GM) / range`` and ``(GM - CSF) / range``: both positive on a T1-weighted scan."""
    if not medians:
        return {}
    return {"wm_minus_gm": (medians["wm"] - medians["gm"]) / medians["range"],
            "gm_minus_csf": (medians["gm"] - medians["csf"]) / medians["range"]}


def check_contrast(margins: dict) -> CheckResult:
    threshold = {"min_wm_minus_gm": MIN_WM_GM_MARGIN, "min_gm_minus_csf": MIN_GM_CSF_MARGIN}
    if not margins:
        return CheckResult("contrast", False, {}, threshold,
                           "T1 contrast: white matter, grey matter or ventricles could not be found in the registered "
                           "brain. Give a T1-weighted brain MRI.")
    value = {k: round(float(v), 4) for k, v in margins.items()}
    wm_gm, gm_csf = margins["wm_minus_gm"], margins["gm_minus_csf"]
    if wm_gm >= MIN_WM_GM_MARGIN and gm_csf >= MIN_GM_CSF_MARGIN:
        return CheckResult("contrast", True, value, threshold)
    found = []
    found.append("white matter is darker than grey matter" if wm_gm < 0 else
                 "white and grey matter are hardly distinguishable" if wm_gm < MIN_WM_GM_MARGIN else "")
    found.append("CSF is brighter than grey matter" if gm_csf < 0 else
                 "grey matter and CSF are hardly distinguishable" if gm_csf < MIN_GM_CSF_MARGIN else "")
    found = "; ".join(f for f in found if f)
    message = (
        f"T1 contrast: inside the registered brain {found} (margins WM-GM {wm_gm:+.2f}, GM-CSF {gm_csf:+.2f} of the "
        f"brain's intensity range; a T1-weighted scan has WM-GM >= {MIN_WM_GM_MARGIN:g} and GM-CSF >= "
        f"{MIN_GM_CSF_MARGIN:g}). This looks like a T2, FLAIR or proton-density scan: the method needs a "
        "T1-weighted MRI (e.g. MPRAGE, SPGR). Give the T1 series of the session."
    )
    return CheckResult("contrast", False, value, threshold, message)


# ------------------------------------------------------------------------------------------------
# Adult volumes
# ------------------------------------------------------------------------------------------------


def subject_volumes_ml(labels: np.ndarray, label_names: dict, voxel_ml: float) -> dict:
    """Intracranial (every label) and brain tissue (every non-fluid label) volume in mL."""
    from inbrainsyn.templates.regions import FLUID_LABEL_NAMES

    labels = np.asarray(labels)
    fluid = [int(v) for v, n in label_names.items() if n in FLUID_LABEL_NAMES]
    icv = float((labels > 0).sum()) * voxel_ml
    brain = float(((labels > 0) & ~np.isin(labels, fluid)).sum()) * voxel_ml
    return {"intracranial_ml": icv, "brain_ml": brain}


def volume_ranges_ml(template_volumes: dict) -> dict:
    """Plausible adult ``intracranial_ml`` and ``brain_ml`` ranges for a bank whose template measures
    ``template_volumes`` (:func:`subject_volumes_ml` of its unwarped labels)."""
    return {"intracranial_ml": [r * template_volumes["intracranial_ml"] for r in ICV_RATIO_RANGE],
            "brain_ml": [r * template_volumes["brain_ml"] for r in BRAIN_RATIO_RANGE]}


def check_volumes(volumes: dict, template_volumes: dict) -> CheckResult:
    icv, brain = volumes["intracranial_ml"], volumes["brain_ml"]
    threshold = {k: [round(v, 1) for v in r] for k, r in volume_ranges_ml(template_volumes).items()}
    (icv_lo, icv_hi), (brain_lo, brain_hi) = threshold["intracranial_ml"], threshold["brain_ml"]
    value = {k: round(float(v), 1) for k, v in volumes.items()}
    problems = []
    if not (icv_lo <= icv <= icv_hi):
        problems.append(f"intracranial volume {icv:.0f} mL (adults: {icv_lo:.0f}-{icv_hi:.0f} mL)")
    if not (brain_lo <= brain <= brain_hi):
        problems.append(f"brain volume {brain:.0f} mL (adults: {brain_lo:.0f}-{brain_hi:.0f} mL)")
    if not problems:
        return CheckResult("volumes", True, value, threshold)
    message = (
        f"volumes: the registered subject has {' and '.join(problems)}. Check the voxel size in the image header "
        "(spacing in mm); the method is for adult human brains."
    )
    return CheckResult("volumes", False, value, threshold, message)


# ------------------------------------------------------------------------------------------------
# Template-to-subject fit
# ------------------------------------------------------------------------------------------------


def check_fit(similarity: float) -> CheckResult:
    passed = bool(np.isfinite(similarity)) and similarity >= MIN_FIT_SIMILARITY
    message = "" if passed else (
        f"no brain found: after registration the template matches the input with local correlation "
        f"{similarity:.2f} (needed: {MIN_FIT_SIMILARITY}). Is the input a T1-weighted brain MRI? "
        "If it is skull-stripped, pass --skull-stripped."
    )
    return CheckResult("fit", passed, {"similarity": round(float(similarity), 4)}, {"min_similarity": MIN_FIT_SIMILARITY},
                       message)


# ------------------------------------------------------------------------------------------------
# Orchestration helpers (called from synthesis with a few lines)
# ------------------------------------------------------------------------------------------------


def coverage_after_affine(subject: sitk.Image, bank, matrix: np.ndarray, offset: np.ndarray) -> CheckResult:
    """The coverage check from the affine alone (run before the SVF: a cropped scan fails in seconds)."""
    # a copy, not a view: bank.mask is a fresh image that nothing else holds, and a view into it reads
    # freed memory once it is collected (coverage 0 % on Dask workers, found by test_evaluate)
    mask = sitk.GetArrayFromImage(bank.mask)
    return check_coverage(brain_coverage(fields.Grid.from_sitk(subject), bank.grid, mask, matrix, offset))


def check_registered(subject: sitk.Image, registered, bank, labels_t: torch.Tensor) -> list:
    """Every check on a registered subject (``synthesis.SubjectInTemplateSpace``).

    ``labels_t``: the bank's labels at the baseline age on the bank grid; warped by the subject's
    ``exp(v)`` they label the subject's own anatomy in template space.
    """
    warped = fields.warp(labels_t.float(), registered.displacement.to(labels_t.device), mode="nearest")
    labels = warped.round().to(torch.int32).cpu().numpy()
    image = registered.image.cpu().numpy()
    voxel_ml = float(np.prod(bank.grid.spacing)) * abs(float(np.linalg.det(registered.affine_matrix))) / 1000.0
    return [
        coverage_after_affine(subject, bank, registered.affine_matrix, registered.affine_offset),
        check_contrast(contrast_margins(tissue_medians(image, labels, bank.label_names))),
        check_volumes(subject_volumes_ml(labels, bank.label_names, voxel_ml),
                      subject_volumes_ml(labels_t.round().to(torch.int32).cpu().numpy(), bank.label_names,
                                         float(np.prod(bank.grid.spacing)) / 1000.0)),
        check_fit(registered.similarity),
    ]


def enforce(results: list, force: bool, reporter=None) -> list:
    """Stop on failed checks (ImplausibleInputError, exit 6) unless ``force``; then warn and go on."""
    failed = [r for r in results if not r.passed]
    if failed and not force:
        raise ImplausibleInputError("the input does not look like what the method needs:\n  - "
                                    + "\n  - ".join(r.message for r in failed) + "\n" + FORCE_HINT)
    if failed and reporter is not None:
        for r in failed:
            reporter.log(f"--force-input: going on although {r.message}", level="warning")
    return results


def manifest_entry(results: list, force: bool) -> dict:
    """The manifest's ``input_checks``: every check, and whether the run went on against any."""
    failed = [r.name for r in results if not r.passed]
    return {"forced": bool(force and failed), "force_input": bool(force), "failed": failed,
            "checks": [r.as_dict() for r in results]}


def report_note(results: list, force: bool) -> str:
    """A line for the report's title when the run went on against failed checks (else empty)."""
    failed = [r.name for r in results if not r.passed]
    return f"\nRUN AGAINST FAILED INPUT CHECKS ({', '.join(failed)}; --force-input): interpret with care" if failed else ""
