"""Distribution of the phantom's anatomy beside published ranges for older adults (docs/evaluation.md).

    python benchmarks/phantom_anatomy.py OUT_STEM PHANTOM_DIR [PHANTOM_DIR ...]

Reads each phantom.json (``anatomy`` of every subject) and writes OUT_STEM.md (table) and OUT_STEM.png
(one panel per quantity, the published range shaded).  Published ranges are relative figures so that
they apply to the MNI-sized template (its ICV is about 2 L, larger than an average adult's ~1.5 L).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# quantity -> (label, published range, source).  Tags as in /work/shared/docs/ATROPHY_LITERATURE.md.
PUBLISHED = {
    "ventricles": ("lateral ventricles / template", (0.6, 3.0),
                   "several-fold between older adults: AD/HC about 1.4-1.6 and roughly doubling from 60 to 85 y "
                   "(ATROPHY_LITERATURE Q2, Q4; [recalled]); ventricles grow 2-10 %/y (Schuff 2012 [verified]); "
                   "the issue's target 0.6-3x"),
    "hippocampus": ("hippocampus / template", (0.5, 1.1),
                    "AD/HC 0.76-0.77 (Shi 2009 meta-analysis [verified]), MCI/HC 0.87-0.89; -16 % from 40 to 75 y "
                    "(J Neuroimaging 2020 Table 1 [verified]); the issue's target 0.5-1.1x"),
    "icv": ("ICV / template ICV", (0.9, 1.1),
            "between-person SD of intracranial volume about 10 % of the mean, men about 10 % larger than women "
            "([recalled]); the issue's target +-10 %"),
    "brain_to_icv": ("brain / ICV", (0.65, 0.80),
                     "brain parenchymal fraction of 60-90-year-olds about 0.65-0.80, falling 0.45 %/y of brain "
                     "(Fotenos 2005 [verified] for the rate; the range [recalled]); AD 4-6 % lower ([recalled])"),
}


def anatomy(folders) -> list[dict]:
    rows = []
    for folder in folders:
        info = json.loads((Path(folder) / "phantom.json").read_text())
        for s in info["subjects"]:
            a = s["anatomy"]
            rows.append({
                "subject": s["subject"], "group": s["group"], "input": s.get("input", "stripped"),
                "ventricles": a["volume_ratio_to_template"]["ventricles"],
                "hippocampus": a["volume_ratio_to_template"]["hippocampus"],
                "icv": a["icv_ml"] / a["template_icv_ml"],
                "brain_to_icv": a["brain_to_icv"],
                "template_brain_to_icv": a["template_brain_to_icv"],
                "distance_mm": a["nonlinear_displacement"]["rms_mm"],
                "p95_mm": a["nonlinear_displacement"]["p95_mm"],
                "largest_mm": a["largest_displacement_mm"],
            })
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stem, folders = Path(argv[0]), argv[1:]
    rows = anatomy(folders)
    lines = [f"Phantom anatomy: {len(rows)} subjects ({', '.join(str(f) for f in folders)})", "",
             "| Quantity | phantom min | 5 % | median | 95 % | max | published / target range | source |",
             "|---|---|---|---|---|---|---|---|"]
    for key, (label, (lo, hi), source) in PUBLISHED.items():
        v = np.array([r[key] for r in rows])
        q = np.percentile(v, [5, 50, 95])
        lines.append(f"| {label} | {v.min():.2f} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {v.max():.2f} | "
                     f"{lo:g}-{hi:g} | {source} |")
    for key, label in (("distance_mm", "non-affine template->subject displacement, RMS in the brain (mm)"),
                       ("p95_mm", "same, 95th percentile (mm)"), ("largest_mm", "largest displacement incl. affine (mm)")):
        v = np.array([r[key] for r in rows])
        q = np.percentile(v, [5, 50, 95])
        lines.append(f"| {label} | {v.min():.1f} | {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} | {v.max():.1f} | "
                     "old phantom: largest 3.6 mm | issue 10 review |")
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(18, 3.6))
    colours = {"HC": "tab:blue", "AD": "tab:red", "HC->AD": "tab:purple"}
    for ax, key in zip(axes, list(PUBLISHED) + ["distance_mm"]):
        label, rng = (PUBLISHED[key][0], PUBLISHED[key][1]) if key in PUBLISHED else ("non-affine RMS (mm)", None)
        if rng:
            ax.axhspan(*rng, color="0.85", label="published / target range")
        for i, group in enumerate(colours):
            v = [r[key] for r in rows if r["group"] == group]
            ax.scatter(np.full(len(v), i) + np.linspace(-0.15, 0.15, max(len(v), 1))[:len(v)], v, s=14,
                       color=colours[group], label=group)
        ax.set_xticks(range(3), list(colours))
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle("Phantom subjects' anatomy (each dot a subject) beside published ranges for older adults")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=80)
    print(Path(f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
