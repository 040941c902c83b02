#!/usr/bin/env python
"""Validation table and atrophy-map figure of the default ageing model (docs/templates.md).

    python tools/ageing_validation.py [--bank DIR] [--figure docs/images/atrophy_map_70.png] [--offgrid]

Prints a Markdown table: per region and cohort the model's annual rate at 65, 75 and 85, its
cumulative change 60 -> 90 (one person), the literature range it comes from, and for HC the
learned-template anchor (AtlasGAN CN templates, SynthSeg volumes at 60/70/80/90 y, issue 13) beside
the change of our HC templates 60 -> 90 measured on the bank.  Writes the figure: the 10-year
atrophy map (local volume change, %) of HC and AD at 70 on the template, three planes, one colour scale.
``--offgrid`` adds the accuracy of ageing between the stored pieces (achieved vs prescribed regional
change on a grid of HC, AD and converter intervals of 2-10 years), with and without the bank's
``ageing_midpoints`` and ``conversion_svfs`` (about 10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

# AtlasGAN CN templates (Fjr9516/Atlas-GAN example/CN_templates), SynthSeg volumes (mL) at 60/70/80/90 y,
# as given in issue 13.  Cortex / cerebral WM of SynthSeg against our cortical GM (all parcels) / cerebral WM.
ATLASGAN = {
    "hippocampus": (10.61, 10.18, 9.62, 9.40),
    "lateral_ventricles": (32.5, 37.6, 45.8, 50.1),
    "cortex (all parcels)": (605.0, 602.0, 597.0, 594.0),
    "cerebral_wm": (614.0, 602.0, 586.0, 579.0),
}


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}"


def table(bank) -> str:
    from inbrainsyn.templates.regions import CORTICAL_PARCEL_LABELS, regional_volumes_ml  # noqa: F401

    model = bank.model
    lines = ["| Region | Cohort | rate 65 | rate 75 | rate 85 (%/y) | 60→90 (one person) | literature (%/y) | AtlasGAN CN 60→90 | bank HC ageing 60→90 (measured) |",
             "|---|---|---|---|---|---|---|---|---|"]
    measured = template_changes(bank)
    for r in model.rates:
        for cohort in ("HC", "AD"):
            rates = [model.rate(r.region, cohort, a) for a in (65, 75, 85)]
            cumulative = math.exp(model.log_volume_change(r.region, cohort, 60, 90)) - 1
            rng = r.hc_range if cohort == "HC" else r.ad_range
            lit = f"{100 * min(rng, key=abs):+.2f} to {100 * max(rng, key=abs):+.2f}" if rng else "-"
            anchor = ours = ""
            key = r.region if r.region in ATLASGAN else None
            if cohort == "HC" and key:
                v = ATLASGAN[key]
                anchor = f"{100 * (v[-1] / v[0] - 1):+.1f} %"
            if cohort == "HC" and r.region in measured:
                ours = f"{100 * measured[r.region]:+.1f} %"
            lines.append(f"| {r.region} | {cohort} | {_pct(rates[0])} | {_pct(rates[1])} | {_pct(rates[2])} | "
                         f"{100 * cumulative:+.0f} % | {lit} | {anchor} | {ours} |")
    v = ATLASGAN["cortex (all parcels)"]
    lines.append(f"| cortex (all parcels) | HC | | | | | -0.51 (Storsve 2014) | {100 * (v[-1] / v[0] - 1):+.1f} % | "
                 f"{100 * measured['cortex (all parcels)']:+.1f} % |")
    return "\n".join(lines)


def template_changes(bank) -> dict[str, float]:
    """Relative volume change 60 -> 90 of the HC template's regions under the bank's stored HC ageing
    (``ageing_svf("HC", 60, 90)``: three 10-year pieces composed), one-hot maps warped trilinearly."""
    import torch

    from inbrainsyn import fields
    from inbrainsyn.templates.regions import CORTICAL_PARCEL_LABELS, one_hot

    values = sorted(bank.label_names)
    labels = bank.labels_tensor("HC", 60).long()
    maps = one_hot(labels, values)
    u = bank.ageing_svf("HC", 60, 90)
    after = fields.warp(maps, fields.exp(u)).sum(dim=(1, 2, 3))
    before = maps.sum(dim=(1, 2, 3))
    out = {bank.label_names[v]: float(a / b) - 1 for v, a, b in zip(values, after, before)}
    cortex = [i for i, v in enumerate(values) if bank.label_names[v] in (*CORTICAL_PARCEL_LABELS.values(), "cortical_gm")]
    out["cortex (all parcels)"] = float(after[cortex].sum() / before[cortex].sum()) - 1
    del torch
    return out


def outside_checks(bank, cases=(("HC", 70, 75), ("HC", 70, 85), ("AD", 70, 85))) -> str:
    """Stillness outside the intracranial volume: |J - 1| > 3 mm outside it, ICV drift, face motion, min J."""
    import scipy.ndimage as ndi
    import torch

    from inbrainsyn import fields

    lines = ["| ageing | max \\|J − 1\\| more than 3 mm outside the ICV | ICV drift | max displacement at the box faces (voxels) | min J |",
             "|---|---|---|---|---|"]
    for cohort, a0, a1 in cases:
        disp = fields.exp(bank.ageing_svf(cohort, a0, a1))
        icv = (bank.labels_tensor(cohort, a0) > 0).numpy()
        outside = ndi.distance_transform_edt(~icv, sampling=bank.spacing_zyx) > 3.0
        jac = fields.jacobian_determinant(disp).numpy()
        drift = float(fields.warp(torch.from_numpy(icv.astype(np.float32)), disp).sum()) / icv.sum() - 1
        faces = max(float(disp[:, i].abs().max()) for i in (0, -1))
        faces = max([faces] + [float(disp[:, :, i].abs().max()) for i in (0, -1)] + [float(disp[..., i].abs().max()) for i in (0, -1)])
        lines.append(f"| {cohort} {a0} → {a1} | {np.abs(jac[outside] - 1).max():.2g} | {100 * drift:.3f} % | {faces:.2g} | {jac.min():.2f} |")
    return "\n".join(lines)


# Off-grid intervals: starts between and on listed ages, 2-10 years, HC / AD; converters (a0, X, a1)
OFFGRID_STARTS = (57, 62, 65, 68, 72, 77, 81, 86)
OFFGRID_YEARS = (2, 4, 7, 10)
OFFGRID_CONVERTERS = ((60, 63, 70), (65, 70, 75), (66, 71, 76), (70, 72, 80), (72, 75, 78), (78, 81, 88))
ABS_FLOOR = 0.005  # log-volume: 0.5 % of a region's volume (why: docs/templates.md section 7)


def offgrid_cases():
    cases = []
    for cohort in ("HC", "AD"):
        for a0 in OFFGRID_STARTS:
            for years in OFFGRID_YEARS:
                a1 = a0 + years
                if a1 <= 95 and not (a0 % 10 == 5 and a1 % 10 == 5):
                    cases.append((cohort, float(a0), float(a1), None))
    cases += [("AD", float(a0), float(a1), float(x)) for a0, x, a1 in OFFGRID_CONVERTERS]
    return cases


def offgrid_accuracy(bank, cases=None, variants=("pieces scaled by time", "with midpoints")) -> list[dict]:
    """Achieved vs prescribed log-volume change of every rated region for each case and loader variant.

    Achieved: the anatomy at ``a0`` (one-hot maps of ``bank.labels_tensor``: nearest-neighbour labels, "nn";
    and the listed template's one-hot maps warped trilinearly along the template path: partial volumes, "pv")
    warped trilinearly by ``exp(bank.ageing_svf(...))``.  Variant "pieces scaled by time" disables the bank's
    ``ageing_midpoints`` and ``conversion_svfs`` (the loader before them).  Returns one row per case, variant
    and region.
    """
    import torch

    from inbrainsyn import fields
    from inbrainsyn.templates.regions import one_hot

    values = sorted(bank.label_names)
    names = [bank.label_names[v] for v in values]
    rated = set(bank.model.regions)
    midpoints, conversions = dict(bank._midpoint_files), dict(bank._conversion_files)
    rows = []
    for cohort, a0, a1, x in cases or offgrid_cases():
        start = "HC" if x is not None else cohort
        nn = one_hot(bank.labels_tensor(start, a0).long(), values)
        lower, upper, _ = bank._bracket(start, a0)
        pv = one_hot(bank._listed_labels(lower).long(), values)
        if upper is not None:
            pv = fields.warp(pv, fields.exp(bank._step_svf(start, lower, upper, a0)))
        goals = bank.model.targets(cohort, a0, a1, x)
        for variant in variants:
            bank._midpoint_files = midpoints if variant == "with midpoints" else {}
            bank._conversion_files = conversions if variant == "with midpoints" else {}
            bank._svf_cache = {k: v for k, v in bank._svf_cache.items() if not (isinstance(k, tuple) and len(k) == 4)}
            disp = fields.exp(bank.ageing_svf(cohort, a0, a1, transition_age=x))
            min_j = float(fields.jacobian_determinant(disp).min())
            for anatomy, maps in (("nn", nn), ("pv", pv)):
                after = fields.warp(maps, disp).sum(dim=(1, 2, 3)).double()
                before = maps.sum(dim=(1, 2, 3)).double()
                for name, a, b in zip(names, after, before):
                    if name in rated:
                        rows.append({"cohort": cohort if x is None else f"HC->AD at {x:g}", "a0": a0, "a1": a1,
                                     "variant": variant, "anatomy": anatomy, "region": name, "goal": goals[name],
                                     "achieved": float(torch.log(a / b)), "min_jacobian": min_j})
    bank._midpoint_files, bank._conversion_files = midpoints, conversions
    return rows


def offgrid_table(rows: list[dict]) -> str:
    """Summary per variant, anatomy and kind of interval: share within 10 %, worst ratio, worst errors."""
    lines = ["| loader | anatomy at a0 | intervals | region-cases | within 10 % of the goal | worst achieved / goal (case) "
             "| max \|error\| (log-volume) | max \|error\| / years (%/y) | within max(10 %, 0.005) | min J |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        kind = "converters" if r["cohort"].startswith("HC->") else r["cohort"]
        key = (r["variant"], r["anatomy"], kind)
        if key not in keys:
            keys.append(key)
    for variant, anatomy, kind in keys:
        sel = [r for r in rows if r["variant"] == variant and r["anatomy"] == anatomy
               and (r["cohort"].startswith("HC->") if kind == "converters" else r["cohort"] == kind)]
        err = [abs(r["achieved"] - r["goal"]) for r in sel]
        rel = [e / abs(r["goal"]) for e, r in zip(err, sel)]
        worst = max(sel, key=lambda r: abs(r["achieved"] / r["goal"] - 1))
        n_cases = len({(r["cohort"], r["a0"], r["a1"]) for r in sel})
        lines.append(
            f"| {variant} | {anatomy} | {kind} ({n_cases}) | {len(sel)} | {100 * sum(x <= 0.10 for x in rel) / len(sel):.1f} % "
            f"| {worst['achieved'] / worst['goal']:.2f} ({worst['region']}, {worst['cohort']} {worst['a0']:g}→{worst['a1']:g}) "
            f"| {max(err):.4f} | {100 * max(e / (r['a1'] - r['a0']) for e, r in zip(err, sel)):.2f} "
            f"| {100 * sum(e <= max(0.10 * abs(r['goal']), ABS_FLOOR) for e, r in zip(err, sel)) / len(sel):.1f} % "
            f"| {min(r['min_jacobian'] for r in sel):.2f} |")
    return "\n".join(lines)


def figure(bank, path: Path, age: float = 70.0, years: float = 10.0, limit: float = 40.0) -> Path:
    """10-year atrophy map of HC and AD at ``age`` on the template, three planes, one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inbrainsyn import fields

    rows = []
    for cohort in ("HC", "AD"):
        u = bank.ageing_svf(cohort, age, age + years)
        ratio = fields.jacobian_determinant(fields.exp(-u)).numpy()  # future / baseline volume at each point
        template = fields.image_to_tensor(bank.template(cohort, age)).numpy()
        labels = bank.labels_tensor(cohort, age).numpy()
        rows.append((cohort, template, 100.0 * (ratio - 1.0), labels > 0))
    hipp = [v for v, n in bank.label_names.items() if n == "hippocampus"][0]
    points = np.argwhere(bank.labels_tensor("HC", age).numpy() == hipp)
    one_side = points[points[:, 2] > points[:, 2].mean()]  # one hippocampus (the array's upper x half)
    zc, yc, xc = (int(round(c)) for c in one_side.mean(0))
    planes = (("axial", lambda a: a[zc, ::-1, ::-1]), ("coronal", lambda a: a[::-1, yc, ::-1]), ("sagittal", lambda a: a[::-1, :, xc]))
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.4), facecolor="black")
    for r, (cohort, template, change, head) in enumerate(rows):
        for c, (plane, cut) in enumerate(planes):
            ax = axes[r, c]
            ax.imshow(cut(template), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            overlay = np.ma.masked_where(~cut(head) | (np.abs(cut(change)) < 1.0), cut(change))
            im = ax.imshow(overlay, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.85, interpolation="nearest")
            ax.set_title(f"{cohort} {age:g} -> {age + years:g} y, {plane}", color="white", fontsize=10)
            ax.axis("off")
    cbar = fig.colorbar(im, ax=axes, fraction=0.025, pad=0.02)
    cbar.set_label("local volume change in 10 years (%)  (blue: shrinks, red: grows)", color="white")
    cbar.ax.yaxis.set_tick_params(color="white")
    plt.setp(cbar.ax.get_yticklabels(), color="white")
    fig.suptitle("Default model bank: 10-year atrophy map at 70 on the template (same colour scale)", color="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", default=None, help="bank folder (default: the shipped one)")
    parser.add_argument("--figure", default="docs/images/atrophy_map_70.png", help="figure path ('' for none)")
    parser.add_argument("--offgrid", action="store_true", help="also the accuracy between stored pieces (~10 min)")
    parser.add_argument("--offgrid-csv", default="", help="write the off-grid rows to this CSV")
    args = parser.parse_args()
    from inbrainsyn.templates import load_bank

    bank = load_bank(args.bank)
    print(table(bank))
    print()
    print(outside_checks(bank))
    if args.offgrid:
        rows = offgrid_accuracy(bank)
        print()
        print(offgrid_table(rows))
        if args.offgrid_csv:
            import csv

            with open(args.offgrid_csv, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    if args.figure:
        print(f"\nfigure: {figure(bank, Path(args.figure))}")


if __name__ == "__main__":
    main()
