"""Registration battery: ours beside ANTs SyN, elastix B-spline and SimpleITK demons on pairs with known truth.

Pairs (``benchmarks/registration_pairs.py``; MNI152 2009a only, never Colin27):

* ``known``: the MNI152 T1 at 2 mm and/or 1 mm deformed by ``exp`` of a smooth random SVF with
  Gaussian smoothness 6, 9, 16 mm, largest vector 5 and 12 mm, seeds 0..N-1;
* ``anatomy``: bank-template-derived subjects (1.5 mm, the grid the product registers on) whose
  lateral ventricles are 0.6-3x and hippocampi 0.5-1.1x the template's, made by the atrophy
  solver (so their labels are known), without and with a synthetic skull + bias + noise
  (preprocessed as ``inbrainsyn synthesize`` does).

Every method registers the same files in its own process (peak memory = that process's
``ru_maxrss``; time = the registration call, wall clock, ``--threads`` threads):

* ``ours``: ``inbrainsyn.registration.register_svf`` with its defaults (brain/support mask given);
* ``ants-syn``: ANTsPy ``SyN`` (defaults: affine + SyN, Mattes MI);
* ``ants-syncc``: ANTsPy ``SyN`` with the CC metric (radius 4) and antsRegistrationSyN.sh's iteration
  schedule 100x70x50x20 (affine + SyN; :data:`SYNCC_CAPPED`; slow: run on a subset);
* ``ants-syncc-full``: ANTsPy ``SyNCC`` (rigid + affine + SyN with CC, 2100x1200x1200x20: > 30 min per pair);
* ``elastix``: itk-elastix default B-spline parameter map (Mattes MI, bending energy, 4 levels);
* ``demons``: SimpleITK ``DiffeomorphicDemonsRegistrationFilter`` after histogram matching,
  3-level pyramid (shrink 4, 2, 1; 50, 50, 25 iterations; field smoothing sigma 1.5 voxels).

Scores (same code for all): EPE inside the fixed brain (mm), tissue Dice (GM, WM; CSF for the
anatomy pairs), regional volumes carried by the result (template one-hot maps warped, summed) vs
the truth, folded voxels (det <= 0), min det J.  Summary: per family and resolution means, paired
EPE differences ours - peer with bootstrap 95 % CIs over the pairs both ran.

Peers are time-boxed: ``--peer-pairs`` limits them to the first K pairs of each group (the pair list
interleaves smoothness and maxima so any prefix mixes them); ``--syncc-pairs`` limits SyNCC further.

Usage (``pip install -e .[bench]``)::

    python benchmarks/bench_registration_battery.py [--families known anatomy] [--resolutions 2 1]
        [--seeds 2] [--methods ours ants-syn ants-syncc elastix demons] [--peer-pairs 4] [--syncc-pairs 2]
        [--threads 2] [--out benchmarks/registration_battery.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
METHODS = ("ours", "ants-syn", "ants-syncc", "ants-syncc-full", "elastix", "demons")
# ANTs SyN with the CC metric, capped: ANTsPy's SyNCC runs 2100x1200x1200x20 SyN iterations (tolerance
# 1e-7) and took > 1800 s per pair on the loaded machine; the capped run uses the schedule of ANTs'
# antsRegistrationSyN.sh (100x70x50x20 at shrink 8x4x2x1, smoothing 3x2x1x0 voxels) with CC radius 4
SYNCC_CAPPED = {"type_of_transform": "SyN", "syn_metric": "CC", "syn_sampling": 4, "reg_iterations": (100, 70, 50, 20)}
ANATOMY_SPECS = ((3.0, 0.5), (0.6, 1.1), (2.0, 0.7), (1.5, 0.9))  # (ventricles x, hippocampus x)


def mni_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
        if folder.exists():
            return folder
    sys.exit("MNI152 maps not found: pip install nilearn")


# ---------------------------------------------------------------------------------------------
# Child process: one method on one pair folder
# ---------------------------------------------------------------------------------------------


def _sitk_demons(fixed, moving):
    import SimpleITK as sitk

    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(256)
    matcher.SetNumberOfMatchPoints(15)
    matcher.ThresholdAtMeanIntensityOn()
    moving = matcher.Execute(moving, fixed)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(1.5)
    field = None
    for shrink, iterations in ((4, 50), (2, 50), (1, 25)):
        if shrink > 1:
            f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, 0.5 * shrink * fixed.GetSpacing()[0]), [shrink] * 3)
            m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, 0.5 * shrink * moving.GetSpacing()[0]), [shrink] * 3)
        else:
            f, m = fixed, moving
        demons.SetNumberOfIterations(iterations)
        if field is None:
            field = demons.Execute(f, m)
        else:
            init = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, init)
    return sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())


def _child(method: str, folder: Path, threads: int, config_json: str) -> None:
    if method == "elastix":
        import itk  # noqa: F401  -- before SimpleITK/torch: the other order segfaults (two ITK builds)
    import resource

    import numpy as np
    import SimpleITK as sitk
    import torch

    from inbrainsyn import fields

    fixed_path, moving_path, mask_path = (str(folder / n) for n in ("fixed.nii.gz", "moving.nii.gz", "mask.nii.gz"))
    fixed_img = sitk.ReadImage(fixed_path)
    grid = fields.Grid.from_sitk(fixed_img)
    extra = {}
    if method == "ours":
        from inbrainsyn.registration import SVFRegistrationConfig, register_svf

        torch.set_num_threads(threads)
        config = SVFRegistrationConfig(**json.loads(config_json or "{}"))
        fixed = fields.image_to_tensor(fixed_img)
        moving = fields.image_to_tensor(sitk.ReadImage(moving_path))
        mask = fields.image_to_tensor(sitk.ReadImage(mask_path)) > 0
        started = time.perf_counter()
        result = register_svf(fixed, moving, grid.spacing, mask=mask, config=config)
        seconds = time.perf_counter() - started
        displacement = result.displacement
        extra["iterations"] = [c["iterations"] for c in result.convergence]
    elif method.startswith("ants"):
        import ants

        fixed = ants.image_read(fixed_path)
        moving = ants.image_read(moving_path)
        options = {"ants-syn": {"type_of_transform": "SyN"}, "ants-syncc": SYNCC_CAPPED,
                   "ants-syncc-full": {"type_of_transform": "SyNCC"}}[method]
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            reg = ants.registration(fixed, moving, outprefix=str(Path(tmp) / "r_"), **options)
            seconds = time.perf_counter() - started
            composed = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=str(Path(tmp) / "c_"))
            field_image = sitk.ReadImage(composed)
        displacement, _ = fields.field_from_sitk(sitk.Cast(field_image, sitk.sitkVectorFloat64), "ants field")
    elif method == "elastix":
        import itk

        fixed = itk.imread(fixed_path, itk.F)
        moving = itk.imread(moving_path, itk.F)
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
        started = time.perf_counter()
        _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
        seconds = time.perf_counter() - started
        deformation = itk.transformix_deformation_field(moving, transform)
        vectors = np.asarray(itk.array_from_image(deformation), dtype=np.float64)  # (Z, Y, X, 3) mm, LPS
        displacement = fields.field_from_physical(vectors, grid)
    elif method == "demons":
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        fixed = sitk.Cast(fixed_img, sitk.sitkFloat32)
        moving = sitk.Cast(sitk.ReadImage(moving_path), sitk.sitkFloat32)
        started = time.perf_counter()
        field_image = _sitk_demons(fixed, moving)
        seconds = time.perf_counter() - started
        displacement, _ = fields.field_from_sitk(sitk.Cast(field_image, sitk.sitkVectorFloat64), "demons field")
    else:
        raise SystemExit(f"unknown method {method}")
    torch.save(displacement.float().contiguous(), folder / f"disp_{method}.pt")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024.0, **extra}))


def run_method(method: str, folder: Path, threads: int, timeout: float, config_json: str) -> dict:
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--folder", str(folder), "--threads", str(threads),
                           "--config", config_json], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=str(folder))  # transformix writes deformationField.nii into the working directory
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------
# Parent: pairs, runs, scores, summary
# ---------------------------------------------------------------------------------------------


def build_groups(families, resolutions, seeds, anatomy_spacing=None):
    """{group name: [pair builder thunks]} (lazy: pairs are built one at a time)."""
    import registration_pairs as rp
    from inbrainsyn.registration import synthetic

    groups = {}
    if "known" in families:
        for res in resolutions:
            specs = []
            for seed in range(seeds):
                for max_mm in (5.0, 12.0):
                    for smooth in (9.0, 6.0, 16.0):
                        specs.append((smooth, max_mm, seed))
            cache = {}

            def images(res=res, cache=cache):
                if "images" not in cache:
                    cache["images"] = synthetic.load_mni(mni_folder(), res)
                return cache["images"]

            groups[f"known {res:g} mm"] = [
                (lambda s=s, images=images: rp.known_pair(images(), *s)) for s in specs
            ]
    if "anatomy" in families:
        from inbrainsyn.templates.bank import load_bank

        cache = {}

        def anatomy():
            if "a" not in cache:
                cache["a"] = rp.load_bank_anatomy(load_bank(None), spacing_mm=anatomy_spacing)
            return cache["a"]

        thunks = []
        for i, (v, h) in enumerate(ANATOMY_SPECS):
            for skull in (False, True):
                thunks.append(lambda v=v, h=h, i=i, skull=skull: rp.anatomy_pair(anatomy(), v, h, i, skull))
        groups[f"anatomy {anatomy_spacing or 1.5:g} mm"] = thunks
    return groups


def benchmark(args) -> list[dict]:
    import SimpleITK as sitk
    import torch

    import registration_pairs as rp
    from inbrainsyn import fields

    rows = []
    groups = build_groups(args.families, args.resolutions, args.seeds, args.anatomy_spacing)
    for group, thunks in groups.items():
        if args.max_pairs:
            thunks = thunks[: args.max_pairs]
        for index, thunk in enumerate(thunks):
            pair = thunk()
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                sitk.WriteImage(fields.tensor_to_image(pair.fixed, pair.grid), str(folder / "fixed.nii.gz"))
                sitk.WriteImage(fields.tensor_to_image(pair.moving, pair.grid), str(folder / "moving.nii.gz"))
                sitk.WriteImage(fields.tensor_to_image(pair.mask.to(torch.uint8), pair.grid, sitk.sitkUInt8),
                                str(folder / "mask.nii.gz"))
                none = rp.score(pair, torch.zeros_like(pair.true_displacement))
                rows.append({"group": group, "pair": pair.name, "method": "none", "seconds": 0.0, **none, **_meta(pair)})
                print(f"[{group}] {pair.name}: before {_short(none)}", flush=True)
                for method in args.methods:
                    if method != "ours" and index >= args.peer_pairs:
                        continue
                    if method.startswith("ants-syncc") and index >= args.syncc_pairs:
                        continue
                    try:
                        stats = run_method(method, folder, args.threads, args.timeout, args.config)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"  {method}: FAILED {str(exc)[:400]}", flush=True)
                        rows.append({"group": group, "pair": pair.name, "method": method, "error": str(exc)[:200]})
                        continue
                    displacement = torch.load(folder / f"disp_{method}.pt")
                    row = {"group": group, "pair": pair.name, "method": method, **stats, **rp.score(pair, displacement),
                           **_meta(pair)}
                    rows.append(row)
                    print(f"  {method}: {_short(row)}", flush=True)
    return rows


def _meta(pair) -> dict:
    return {k: v for k, v in pair.meta.items() if not k.startswith("solver")}


def _short(row: dict) -> str:
    keys = ("seconds", "epe_mean_mm", "dice_gm", "dice_wm", "ventricles_rel_err", "hippocampus_rel_err", "folded_voxels")
    return " ".join(f"{k}={row[k]:.3f}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row)


def bootstrap_ci(values, n=2000, seed=0):
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def summarise(rows):
    """Per group and method: means over the pairs it ran, and paired differences to ours."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for group in dict.fromkeys(r["group"] for r in ok):
        in_group = [r for r in ok if r["group"] == group]
        ours = {r["pair"]: r for r in in_group if r["method"] == "ours"}
        for method in dict.fromkeys(r["method"] for r in in_group):
            mine = [r for r in in_group if r["method"] == method]
            summary = {"group": group, "method": method, "pairs": len(mine)}
            for key in ("seconds", "peak_mb", "epe_mean_mm", "epe_p95_mm", "dice_gm", "dice_wm", "dice_csf", "min_jacobian"):
                vals = [r[key] for r in mine if r.get(key) is not None]
                if vals:
                    summary[key] = statistics.fmean(vals) if key != "min_jacobian" else min(vals)
            summary["folded_voxels"] = sum(r.get("folded_voxels", 0) for r in mine)
            for region in ("ventricles", "hippocampus"):
                errs = [abs(r[f"{region}_rel_err"]) for r in mine if f"{region}_rel_err" in r]
                if errs:
                    summary[f"{region}_abs_rel_err_mean"] = statistics.fmean(errs)
                    summary[f"{region}_abs_rel_err_max"] = max(errs)
            if method not in ("ours", "none"):
                shared = [r for r in mine if r["pair"] in ours]
                diffs = [ours[r["pair"]]["epe_mean_mm"] - r["epe_mean_mm"] for r in shared]
                if diffs:
                    summary["ours_minus_peer_epe"] = statistics.fmean(diffs)
                    summary["ours_minus_peer_epe_ci95"] = bootstrap_ci(diffs)
                    summary["ours_epe_on_same_pairs"] = statistics.fmean(ours[r["pair"]]["epe_mean_mm"] for r in shared)
                    summary["ours_seconds_on_same_pairs"] = statistics.fmean(ours[r["pair"]]["seconds"] for r in shared)
                    gm = [ours[r["pair"]]["dice_gm"] - r["dice_gm"] for r in shared]
                    summary["ours_minus_peer_dice_gm"] = statistics.fmean(gm)
            out.append(summary)
    return out


LABELS = {
    "none": "no registration",
    "ours": "**inbrainsyn SVF** (defaults)",
    "ants-syn": "ANTsPy SyN (default)",
    "ants-syncc": "ANTsPy SyN, CC metric (100x70x50x20)",
    "ants-syncc-full": "ANTsPy SyNCC (full schedule)",
    "elastix": "elastix B-spline (default)",
    "demons": "SimpleITK diffeomorphic demons",
}


def _f(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def markdown(rows, summary, command, args, load_before, load_after) -> str:
    lines = [
        "# Registration battery: known deformations and inter-anatomy pairs",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, {args.threads} thread(s) per method; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}; load average (1, 5, 15 min) "
        f"before {load_before}, after {load_after} (times are inflated when the load exceeds the core count).",
        f"Peers ran on the first {args.peer_pairs} pairs of each group (SyNCC on the first {args.syncc_pairs}); ours on all.",
        "Time = the registration call (wall); memory = peak RSS of the method's process. EPE in the fixed brain. "
        "Volume errors: |carried / true - 1| (template one-hot maps warped by the result).",
        "",
        "## Summary (means over the pairs each method ran)",
        "",
        "| group | method | pairs | time (s) | peak MB | EPE (mm) | EPE p95 | Dice GM | Dice WM | Dice CSF | vent. err mean/max | hipp. err mean/max | folded | min det J | ours - peer EPE [95% CI] (ours EPE, s on those pairs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        vent = f"{_f(s.get('ventricles_abs_rel_err_mean'), '.1%')} / {_f(s.get('ventricles_abs_rel_err_max'), '.1%')}" if "ventricles_abs_rel_err_mean" in s else "-"
        hipp = f"{_f(s.get('hippocampus_abs_rel_err_mean'), '.1%')} / {_f(s.get('hippocampus_abs_rel_err_max'), '.1%')}" if "hippocampus_abs_rel_err_mean" in s else "-"
        if "ours_minus_peer_epe" in s:
            lo, hi = s["ours_minus_peer_epe_ci95"]
            paired = (f"{s['ours_minus_peer_epe']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                      f"({s['ours_epe_on_same_pairs']:.3f} mm, {s['ours_seconds_on_same_pairs']:.1f} s)")
        else:
            paired = ""
        lines.append(
            f"| {s['group']} | {LABELS.get(s['method'], s['method'])} | {s['pairs']} | {_f(s.get('seconds'), '.1f')} | "
            f"{_f(s.get('peak_mb'), '.0f')} | {_f(s.get('epe_mean_mm'), '.3f')} | {_f(s.get('epe_p95_mm'), '.2f')} | "
            f"{_f(s.get('dice_gm'), '.3f')} | {_f(s.get('dice_wm'), '.3f')} | {_f(s.get('dice_csf'), '.3f')} | {vent} | {hipp} | "
            f"{s['folded_voxels']} | {_f(s.get('min_jacobian'), '.2f')} | {paired} |"
        )
    lines += ["", "## Every run", "",
              "| group | pair | method | time (s) | EPE (mm) | Dice GM | Dice WM | ventricles mL (true) | hippocampus mL (true) | folded | min det J |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            reason = " ".join(r["error"].split())[:60]
            lines.append(f"| {r['group']} | {r['pair']} | {r['method']} | {reason} | | | | | | | |")
            continue
        vent = f"{r['ventricles_ml']:.1f} ({r['ventricles_true_ml']:.1f})" if "ventricles_ml" in r else "-"
        hipp = f"{r['hippocampus_ml']:.2f} ({r['hippocampus_true_ml']:.2f})" if "hippocampus_ml" in r else "-"
        lines.append(f"| {r['group']} | {r['pair']} | {r['method']} | {_f(r.get('seconds'), '.1f')} | {r['epe_mean_mm']:.3f} | "
                     f"{r['dice_gm']:.3f} | {r['dice_wm']:.3f} | {vent} | {hipp} | {r['folded_voxels']} | {r['min_jacobian']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs="+", default=["known", "anatomy"], choices=["known", "anatomy"])
    parser.add_argument("--resolutions", type=float, nargs="+", default=[2.0, 1.0], help="known-deformation grids (mm)")
    parser.add_argument("--seeds", type=int, default=2, help="random fields per (smoothness, maximum)")
    parser.add_argument("--anatomy-spacing", type=float, default=None,
                        help="inter-anatomy pairs on this grid (mm; default: the bank's 1.5 mm grid)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-pairs", type=int, default=0, help="at most this many pairs per group (0: all)")
    parser.add_argument("--peer-pairs", type=int, default=4, help="peers run on the first K pairs of each group")
    parser.add_argument("--syncc-pairs", type=int, default=2, help="ANTs SyNCC on the first K pairs of each group")
    parser.add_argument("--config", default="", help="JSON overrides of SVFRegistrationConfig for ours (tuning)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before giving up")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "registration_battery.md"))
    args = parser.parse_args()
    if args.child:
        _child(args.child, Path(args.folder), args.threads, args.config)
        return
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else str(script)
    command = " ".join(["python", shown, *sys.argv[1:]])
    load_before = tuple(round(x, 1) for x in os.getloadavg())
    rows = benchmark(args)
    load_after = tuple(round(x, 1) for x in os.getloadavg())
    summary = summarise(rows)
    out = Path(args.out)
    out.write_text(markdown(rows, summary, command, args, load_before, load_after))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "load_before": load_before, "load_after": load_after,
                                                    "summary": summary, "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
