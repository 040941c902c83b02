"""``inbrainsyn evaluate``: every method against the true follow-ups of a phantom cohort.

Methods compared (all predict the follow-up at age T from the baseline at age A):

* ``pole``, ``schild``, ``conjugation``, ``half-conjugation``: InBrainSyn with that transport;
* ``untransported``: the template ageing ``u`` applied to the subject as is (``w = u``);
* ``template``: the reference code's baseline, the subject registered onto the target-age template
  (``S o exp(v') ~ T(T)``) and the warped subject returned;
* ``copy``: the baseline scan itself.

Metrics, inside the true follow-up's brain mask, after each image is mapped to [0, 1] by its own
1st-99th percentiles there: PSNR (data range 1), SSIM (3D, Gaussian window sigma 1.5 voxel), MAE,
and the mean Dice over the labelled regions of the subject's own baseline label map carried by each
method's deformation (as the reference code warps SynthSeg of the baseline).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from inbrainsyn import fields, io
from inbrainsyn.errors import InputError
from inbrainsyn.progress import Reporter

METHODS = ("pole", "schild", "conjugation", "half-conjugation", "untransported", "template", "copy")
METRICS = ("psnr", "ssim", "mae", "dice")


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


def image_metrics(pred: sitk.Image, truth: sitk.Image, mask: sitk.Image, pred_labels, true_labels, labels) -> dict:
    m = sitk.GetArrayViewFromImage(mask) > 0
    p = unit_range(sitk.GetArrayFromImage(pred).astype(np.float64), m)
    t = unit_range(sitk.GetArrayFromImage(truth).astype(np.float64), m)
    return {
        "psnr": psnr(p, t, m),
        "ssim": ssim(p, t, m),
        "mae": float(np.mean(np.abs(p[m] - t[m]))),
        "dice": mean_dice(sitk.GetArrayViewFromImage(pred_labels), sitk.GetArrayViewFromImage(true_labels), labels),
    }


# ------------------------------------------------------------------------------------------------
# Cohort
# ------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    subject: str
    age: float
    group: str
    transition_age: float | None
    image: Path
    labels: Path
    mask: Path


def read_cohort(folder: Path) -> dict[str, list[Scan]]:
    """Scans of a phantom cohort (``cohort.csv``) grouped by subject, sorted by age."""
    csv_path = Path(folder) / "cohort.csv"
    if not csv_path.exists():
        raise InputError(f"{csv_path}: not found; make a phantom cohort with `inbrainsyn phantom -o {folder}`")
    subjects: dict[str, list[Scan]] = {}
    with open(csv_path) as handle:
        for row in csv.DictReader(handle):
            transition = row.get("transition_age") or ""
            scan = Scan(
                subject=row["subject"],
                age=float(row["age"]),
                group=row["group"],
                transition_age=float(transition) if transition not in ("", "nan", "None") else None,
                image=Path(folder) / row["path"],
                labels=Path(folder) / row["labels_path"],
                mask=Path(folder) / row["mask_path"],
            )
            subjects.setdefault(scan.subject, []).append(scan)
    return {k: sorted(v, key=lambda s: s.age) for k, v in sorted(subjects.items())}


def evaluate_subject(scans: list[Scan], bank, device, label_ids, methods=METHODS, reporter=None) -> list[dict]:
    """Predict every follow-up of one subject with every method; one row per (follow-up, method)."""
    from inbrainsyn.registration import register_svf
    from inbrainsyn.native import GridImage, NativeMapper
    from inbrainsyn.synthesis import SynthesisRequest, cohort_ageing_svf, register_subject, transport_on_coarse_grid

    baseline, follow_ups = scans[0], scans[1:]
    cohort = "HC" if baseline.group.upper().startswith("HC") else "AD"
    transition = baseline.transition_age if cohort == "HC" else None
    subject = io.read_image(baseline.image)
    request = SynthesisRequest(
        input_path=str(baseline.image), age=baseline.age, targets=[s.age for s in follow_ups], cohort=cohort,
        transition_age=transition, skull_stripped=True,
    )
    registered = register_subject(subject, request, bank, device, reporter or Reporter())
    mapper = NativeMapper(fields.Grid.from_sitk(subject), bank.grid, registered.affine_matrix, registered.affine_offset, device)
    low, high = (float(x) for x in (sitk.GetArrayViewFromImage(subject).min(), sitk.GetArrayViewFromImage(subject).max()))
    # Like the reference code (which warps SynthSeg of the baseline), every method carries the
    # subject's own baseline label map with its deformation, and "copy" keeps it as is, so Dice
    # compares deformations, not segmentations.
    baseline_labels = sitk.Cast(sitk.ReadImage(str(baseline.labels)), sitk.sitkInt16)
    subject_spline, labels_nearest = GridImage(subject, device, "bspline"), GridImage(baseline_labels, device, "nearest")

    def warped(template_displacement):
        """The subject (B-spline) and its labels (nearest) warped on the native grid by a template-space map."""
        image = np.clip(mapper.warp_native(subject_spline, template_displacement), low, high)
        labels = np.rint(mapper.warp_native(labels_nearest, template_displacement))
        as_image = lambda a, like, pixel: sitk.Cast(_on_grid(a, like), pixel)  # noqa: E731
        return as_image(image, subject, sitk.sitkFloat32), as_image(labels, baseline_labels, sitk.sitkInt16)
    rows = []
    for scan in follow_ups:
        truth = io.read_image(scan.image)
        true_labels, mask = sitk.ReadImage(str(scan.labels)), sitk.ReadImage(str(scan.mask))
        u = cohort_ageing_svf(bank, cohort, baseline.age, scan.age, transition).to(device)
        v = registered.velocity.to(device)
        for method in methods:
            started = time.perf_counter()
            if method == "copy":
                pred, pred_labels = subject, baseline_labels
            elif method == "template":
                # The subject (in template space) registered onto the target-age template.
                target_template = fields.image_to_tensor(bank.template(cohort, scan.age))
                result = register_svf(target_template, registered.image, spacing=bank.grid.spacing, device=device)
                pred, pred_labels = warped(result.displacement.detach())
            else:
                w = u if method == "untransported" else transport_on_coarse_grid(u, v, method, request.transport_coarsening)
                pred, pred_labels = warped(fields.accurate_exp(w))
            metrics = image_metrics(pred, truth, mask, pred_labels, true_labels, label_ids)
            rows.append({
                "subject": baseline.subject, "group": baseline.group, "baseline_age": baseline.age, "age": scan.age,
                "method": method, **metrics, "seconds": time.perf_counter() - started,
            })
    return rows


def _on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(reference)
    return image


def summarise(rows: list[dict], methods=METHODS) -> list[dict]:
    """Mean and standard deviation of each metric per method."""
    summary = []
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        if not chosen:
            continue
        entry = {"method": method, "n": len(chosen)}
        for metric in METRICS:
            values = np.asarray([r[metric] for r in chosen], dtype=np.float64)
            entry[metric] = float(np.nanmean(values))
            entry[f"{metric}_sd"] = float(np.nanstd(values))
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| Method | PSNR (dB) | SSIM | MAE | Dice | n |",
        "|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['method']} | {e['psnr']:.2f} ± {e['psnr_sd']:.2f} | {e['ssim']:.3f} ± {e['ssim_sd']:.3f} | "
            f"{e['mae']:.4f} ± {e['mae_sd']:.4f} | {e['dice']:.3f} ± {e['dice_sd']:.3f} | {e['n']} |"
        )
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict], path: Path, methods=METHODS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in methods if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, metric in zip(axes, METRICS):
        data = [[r[metric] for r in rows if r["method"] == m] for m in present]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(present) + 1), present, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric.upper())
        ax.grid(alpha=0.3)
    fig.suptitle("Phantom cohort: prediction of true follow-ups (synthetic ground truth)")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def run_evaluation(phantom: Path, outdir: Path, bank_path=None, device="auto", subjects: int | None = None,
                   methods=METHODS, overwrite=False, reporter=None, first_subject: int = 0) -> dict:
    from inbrainsyn.templates import load_bank

    cohort = read_cohort(Path(phantom))
    chosen = list(cohort.items())[first_subject:]
    cohort = dict(chosen[:subjects] if subjects is not None else chosen)
    if not cohort:
        raise InputError(f"{phantom}: no subjects selected (first subject {first_subject}, count {subjects})")
    bank = load_bank(bank_path)
    dev = fields.resolve_device(device)
    label_ids = sorted(int(k) for k in bank.label_names if int(k) != 0)
    rows = []
    with io.staged_output_dir(outdir, overwrite) as stage:
        for i, (name, scans) in enumerate(cohort.items()):
            if reporter:
                reporter.progress("evaluate", i / len(cohort), f"subject {name}")
            if len(scans) < 2:
                continue
            rows.extend(evaluate_subject(scans, bank, dev, label_ids, methods))
        summary = summarise(rows, methods)
        with io.atomic_path(stage / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        table = markdown_table(summary)
        with io.atomic_path(stage / "table.md") as tmp:
            tmp.write_text(table, encoding="utf-8")
        plot_summary(rows, stage / "metrics.png", methods)
        result = {"subjects": len(cohort), "follow_ups": len(rows) // max(len(methods), 1), "summary": summary}
        io.write_json({"tool": "inbrainsyn", "command": "evaluate", "phantom": str(Path(phantom).absolute()), **result,
                       "outputs": [{"kind": "metrics", "path": "metrics.csv"}, {"kind": "table", "path": "table.md"},
                                   {"kind": "plot", "path": "metrics.png"}]}, stage / "manifest.json")
    return result
