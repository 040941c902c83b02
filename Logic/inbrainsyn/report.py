"""Run outputs a person reads: ``volumes.csv`` and ``report.png``."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inbrainsyn.io import atomic_path

NOTE_STEP = 0.012  # figure fraction per line of notes
REGIONS = ("ventricles", "hippocampus", "amygdala", "gm", "wm", "whole_brain")


def write_volumes_csv(rows: list[dict], path: Path) -> Path:
    """Long format ``age,cohort,region,volume_ml``: one row per age and region (baseline included)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["age", "cohort", "region", "volume_ml"])
        for row in rows:
            for region in REGIONS:
                if region in row:
                    writer.writerow([f"{row['age']:g}", row["cohort"], region, f"{row[region]:.3f}"])
    return Path(path)


def _orthogonal_slices(image: sitk.Image, centre_mm=None):
    """Axial, coronal and sagittal slices through ``centre_mm`` (default: image centre), resampled to
    an RAS-oriented display (radiological views with isotropic pixels)."""
    oriented = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(oriented)  # (S->I? , P, L) in LPS: z=I->S, y=A->P, x=R->L
    spacing = oriented.GetSpacing()
    if centre_mm is None:
        idx = [s // 2 for s in oriented.GetSize()]
    else:
        idx = list(oriented.TransformPhysicalPointToIndex(centre_mm))
        idx = [min(max(i, 0), n - 1) for i, n in zip(idx, oriented.GetSize())]
    axial = array[idx[2], ::-1, :]  # anterior up
    coronal = array[::-1, idx[1], :]  # superior up
    sagittal = array[::-1, :, idx[0]]  # superior up, anterior left
    aspects = (spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1])
    return (axial, coronal, sagittal), aspects


def write_report(folder: Path, outputs: list[dict], volumes: list[dict], path: Path, title: str = "",
                 notes: list[str] | None = None) -> Path:
    """Baseline and targets side by side in three planes, difference and atrophy overlays, volume curves;
    ``notes``: lines printed under the figure (the template-to-subject fit; a line starting with
    WARNING is shown in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    baseline = next(o for o in outputs if o["kind"] == "baseline")
    synthetic = [o for o in outputs if o["kind"] == "synthetic"]
    by_age = lambda kind: {o["age"]: o for o in outputs if o["kind"] == kind}  # noqa: E731
    jacobians, differences = by_age("jacobian"), by_age("difference")

    base_img = sitk.ReadImage(str(folder / baseline["path"]))
    mask_out = next((o for o in outputs if o["kind"] == "mask"), None)
    centre, mask_img = None, None
    if mask_out is not None:
        mask_img = sitk.Cast(sitk.ReadImage(str(folder / mask_out["path"])), sitk.sitkUInt8)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(mask_img)
        if stats.HasLabel(1):
            centre = stats.GetCentroid(1)
    base_slices, aspects = _orthogonal_slices(base_img, centre)
    # overlays are shown inside the brain only (outside, the maps are not meaningful)
    mask_slices = _orthogonal_slices(mask_img, centre)[0] if mask_img is not None else [np.ones_like(x) for x in base_slices]
    vmax = float(np.percentile(sitk.GetArrayViewFromImage(base_img), 99.5))

    columns = 1 + len(synthetic)
    width = 3.0 * columns + 3.5
    note_lines = [(part, "red" if line.startswith("WARNING") else "0.2")
                  for line in (notes or []) for part in textwrap.wrap(line, int(width * 17))]
    fig = plt.figure(figsize=(width, 12.5))
    grid = fig.add_gridspec(5, columns + 1, width_ratios=[1] * columns + [1.3])
    plane_names = ("axial", "coronal", "sagittal")
    for col, item in enumerate([baseline] + synthetic):
        image = base_img if item is baseline else sitk.ReadImage(str(folder / item["path"]))
        slices, _ = _orthogonal_slices(image, centre)
        for row in range(3):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(slices[row], cmap="gray", vmin=0, vmax=vmax, aspect=aspects[row], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                label = "baseline" if item is baseline else "synthetic"
                ax.set_title(f"{label}\nage {item['age']:g} ({item.get('cohort', '')})", fontsize=9)
            if col == 0:
                ax.set_ylabel(plane_names[row])
        if item is not baseline:
            diff_slices, _ = _orthogonal_slices(sitk.ReadImage(str(folder / differences[item["age"]]["path"])), centre)
            ax = fig.add_subplot(grid[3, col])
            ax.imshow(base_slices[0], cmap="gray", vmin=0, vmax=vmax, aspect=aspects[0])
            lim = max(1e-6, float(np.percentile(np.abs(diff_slices[0]), 99.5)))
            hidden = (np.abs(diff_slices[0]) < 0.05 * lim) | (mask_slices[0] == 0)
            ax.imshow(np.ma.masked_where(hidden, diff_slices[0]), cmap="coolwarm", vmin=-lim, vmax=lim, alpha=0.8, aspect=aspects[0])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("difference (axial)", fontsize=8)
            jac_slices, _ = _orthogonal_slices(sitk.ReadImage(str(folder / jacobians[item["age"]]["path"])), centre)
            ax = fig.add_subplot(grid[4, col])
            ax.imshow(base_slices[1], cmap="gray", vmin=0, vmax=vmax, aspect=aspects[1])
            jac = jac_slices[1]
            hidden = (np.abs(jac - 1) < 0.01) | (mask_slices[1] == 0)
            shown = ax.imshow(np.ma.masked_where(hidden, jac), cmap="RdBu", vmin=0.7, vmax=1.3, alpha=0.85, aspect=aspects[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("volume ratio (coronal)", fontsize=8)
    if synthetic:
        cbar_ax = fig.add_axes([0.03, 0.05 + NOTE_STEP * len(note_lines), 0.12, 0.01])
        fig.colorbar(shown, cax=cbar_ax, orientation="horizontal", label="future / baseline volume")

    ages = [row["age"] for row in volumes]
    for k, regions in enumerate((("whole_brain", "gm", "wm"), ("ventricles", "hippocampus", "amygdala"))):
        ax = fig.add_subplot(grid[k * 2 : k * 2 + 2, columns])
        for region in regions:
            values = [row.get(region, np.nan) for row in volumes]
            if values and np.isfinite(values[0]) and values[0] > 0:
                ax.plot(ages, 100.0 * np.asarray(values) / values[0], "o-", label=f"{region} ({values[0]:.0f} mL)")
        ax.axhline(100, color="0.7", lw=0.8)
        ax.set_xlabel("age (years)")
        ax.set_ylabel("volume (% of baseline)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title + "\nSynthetic images: a model-based prediction, not a diagnosis.", fontsize=10)
    for k, (line, colour) in enumerate(reversed(note_lines)):
        fig.text(0.01, 0.004 + NOTE_STEP * k, line, fontsize=7, ha="left", va="bottom", color=colour)
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.08 + NOTE_STEP * len(note_lines), top=0.92, wspace=0.15, hspace=0.25)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return Path(path)
