"""Cohort outputs of ``inbrainsyn batch``: ``cohort_volumes.csv`` and ``cohort_report.png``.

``cohort_volumes.csv`` is every subject's ``volumes.csv`` in one long table
(``subject,age,cohort,region,volume_ml``; ``cohort`` is the ageing at that age, AD after a conversion).
``cohort_report.png`` shows each region's volume change from the subject's baseline (%) against age,
one panel column per run type (HC, AD, HC->AD), one thin line per subject and the median in bold.
The median is taken over subjects at equal *years from baseline* and drawn from the median baseline
age (subjects of a cohort table rarely share baseline ages; equal horizons are what a cohort shares).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from inbrainsyn.io import atomic_path
from inbrainsyn.report import REGIONS

COLUMNS = ("subject", "age", "cohort", "region", "volume_ml")


def collect_volumes(outdir: Path, rows) -> list[dict]:
    """Rows of every finished subject's ``volumes.csv`` with the subject id (missing files are skipped)."""
    out = []
    for row in rows:
        path = Path(outdir) / row.subject / "volumes.csv"
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8") as handle:
            for entry in csv.DictReader(handle):
                out.append({"subject": row.subject, "age": float(entry["age"]), "cohort": entry["cohort"],
                            "region": entry["region"], "volume_ml": float(entry["volume_ml"])})
    return out


def write_cohort_volumes(volumes: list[dict], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for v in volumes:
            writer.writerow([v["subject"], f"{v['age']:g}", v["cohort"], v["region"], f"{v['volume_ml']:.3f}"])
    return Path(path)


def percent_change(volumes: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{subject: {region: [(age, % change from the subject's baseline), ...]}}`` sorted by age."""
    by = defaultdict(lambda: defaultdict(list))
    for v in volumes:
        by[v["subject"]][v["region"]].append((v["age"], v["volume_ml"]))
    out = {}
    for subject, regions in by.items():
        out[subject] = {}
        for region, points in regions.items():
            points.sort()
            base = points[0][1]
            if base > 0:
                out[subject][region] = [(age, 100.0 * (vol / base - 1.0)) for age, vol in points]
    return out


def median_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Median % change at each horizon (years from baseline, to 0.1 y) shared by at least two subjects
    (or by the only one), placed at the median baseline age."""
    if not curves:
        return []
    start = float(np.median([c[0][0] for c in curves]))
    at = defaultdict(list)
    for curve in curves:
        for age, change in curve:
            at[round(age - curve[0][0], 1)].append(change)
    need = min(2, len(curves))
    return [(start + h, float(np.median(v))) for h, v in sorted(at.items()) if len(v) >= need]


def run_type(row) -> str:
    return "HC->AD" if row.transition_age is not None else row.cohort


def write_cohort_report(volumes: list[dict], rows: dict, path: Path) -> Path:
    """Regional % change against age; columns HC / AD (/ HC->AD), a row per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    changes = percent_change(volumes)
    types = [t for t in ("HC", "AD", "HC->AD") if any(run_type(rows[s]) == t for s in changes)] or ["HC", "AD"]
    regions = [r for r in REGIONS if any(r in c for c in changes.values())] or list(REGIONS)
    colours = {"HC": "tab:blue", "AD": "tab:red", "HC->AD": "tab:purple"}
    fig, axes = plt.subplots(len(regions), len(types), figsize=(4.2 * len(types), 2.3 * len(regions)),
                             squeeze=False, sharex=True, sharey="row")
    for col, kind in enumerate(types):
        subjects = [s for s in changes if run_type(rows[s]) == kind]
        for row_i, region in enumerate(regions):
            ax = axes[row_i][col]
            curves = [changes[s][region] for s in subjects if region in changes[s]]
            for curve in curves:
                ax.plot(*zip(*curve), color=colours[kind], alpha=0.35, lw=0.9, marker=".", ms=3)
            median = median_curve(curves)
            if median:
                ax.plot(*zip(*median), color="black", lw=2.2, label="median")
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.grid(alpha=0.3)
            if row_i == 0:
                ax.set_title(f"{kind}  (n = {len(subjects)})")
            if col == 0:
                ax.set_ylabel(f"{region.replace('_', ' ')}\n% change")
            if row_i == len(regions) - 1:
                ax.set_xlabel("age (years)")
            if row_i == 0 and col == 0 and median:
                ax.legend(loc="best", fontsize=8, frameon=False)
    fig.suptitle("Regional volume change from each subject's baseline (thin: subjects; bold: median at equal "
                 "years from baseline, from the median baseline age)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
