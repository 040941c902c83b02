"""DaniNet slice preview: one axial slice of a template-space volume at several target ages.

:func:`preview_slices` is THE entry point (the CLI ``inbrainsyn daninet preview`` and the Slicer
module's slice preview both call it). For a baseline slice x at age a0 and diagnosis d:

1. z = E(x); per-bin outputs g_b = G(z, b, d, k), b = 0..9;
2. continuous age: g(t) = sum_b m_b(t) g_b (Gaussian membership, sigma 2.5 y, as the code's
   3D assembly);
3. assembly onto the subject's own slice (``assembly``):

   * ``"residual"`` (default, ours): y(t) = clip(x + D(t), 0, 1), D(t) = g(t) - g(a0); for
     t > a0 only darkening is kept (D = min(D, 0)), for t < a0 only brightening. The generator's
     reconstruction error cancels in D, so the subject's detail is kept.
   * ``"blend"`` (the public code): g(t) is histogram-matched to x (quantile map from g(a0) to x,
     applied to g(t), which keeps the age change), then y = (1 - p) x + p g(t) with
     p = min(1, sqrt(|t - a0| / 25)), keeping only darkening for future ages.

Input: a volume (Z, Y, X) already in template space (the model's grid), in [0, 1] or in
scanner units (then normalised by its 99.5th percentile).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry
from inbrainsyn.daninet.model import DaniNet
from inbrainsyn.errors import InputError

ASSEMBLIES = ("residual", "blend")
TARGET_AGE_RANGE = (50.0, 100.0)


def default_weights_path() -> Path:
    from inbrainsyn.paths import resource_path

    return resource_path("daninet", "daninet.pt")


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float):
    from inbrainsyn.daninet import flow

    blob = flow.read_blob(path)
    if blob["format"] == flow.FORMAT:
        return flow.SliceAgeingNet.from_blob(blob)
    return DaniNet.load(path)


def is_flow(model) -> bool:
    """Whether ``model`` is the slice-ageing (displacement + residual) model of ``flow.py``."""
    from inbrainsyn.daninet.flow import SliceAgeingNet

    return isinstance(model, SliceAgeingNet)


def load_model(weights: str | Path | None = None):
    """The model at ``weights`` (default: the shipped one), cached while the file is unchanged: a
    :class:`~inbrainsyn.daninet.flow.SliceAgeingNet` (shipped) or an adversarial :class:`DaniNet`."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise InputError(f"DaniNet weights not found: {path} (train them with 'inbrainsyn daninet train' "
                         "or reinstall the package to get the shipped model)")
    return _load_cached(str(path.resolve()), path.stat().st_mtime)


def template_grid(model) -> sitk.Image | None:
    """An empty image on the template grid the model was trained on, from ``model.meta``
    (``grid_size_zyx``, ``spacing``, ``origin``, ``direction`` in ITK's x, y, z order), or None when
    the weights do not record the grid's geometry (then the caller reads it from the bank)."""
    meta = getattr(model, "meta", None) or {}
    if not all(key in meta for key in ("grid_size_zyx", "spacing", "origin", "direction")):
        return None
    image = sitk.Image([int(n) for n in reversed(meta["grid_size_zyx"])], sitk.sitkUInt8)
    image.SetSpacing([float(v) for v in meta["spacing"]])
    image.SetOrigin([float(v) for v in meta["origin"]])
    image.SetDirection([float(v) for v in meta["direction"]])
    return image


def _check_targets(targets) -> list[float]:
    out = []
    for t in list(targets):
        t = float(t)
        if not np.isfinite(t) or not TARGET_AGE_RANGE[0] <= t <= TARGET_AGE_RANGE[1]:
            raise InputError(f"target age {t} is outside {TARGET_AGE_RANGE[0]:.0f}-{TARGET_AGE_RANGE[1]:.0f} years")
        out.append(t)
    if not out:
        raise InputError("give at least one target age")
    return out


@torch.no_grad()
def bin_outputs(model: DaniNet, frame: torch.Tensor, dx: int, slice_index: int) -> torch.Tensor:
    """g_b for all bins: frame (1, 1, S, S) -> (10, 1, S, S) in [-1, 1], on the CPU.

    Runs on the model's device (every tensor made inside is made there too).
    """
    device = next(model.parameters()).device
    with torch.device(device):
        z = model.E(frame.to(device))
        g = model.generate_all_bins(z, torch.tensor([dx]), torch.tensor([slice_index]))[0]
    return g.cpu()


def on_device(model: DaniNet, device: torch.device | str | None) -> DaniNet:
    """``model`` on ``device`` (a copy when it must move: the loaded model is cached and shared)."""
    device = torch.device(device or "cpu")
    if next(model.parameters()).device == device:
        return model
    import copy

    return copy.deepcopy(model).to(device)


@torch.no_grad()
def flow_rates_on_slice(model, frame: torch.Tensor, shape: tuple[int, int], age: float, dx, slice_index: int):
    """The slice-ageing model's per-year rates on the slice's own grid: u (1, 2, Y, X) in slice
    pixels, r (1, 1, Y, X) in [-1, 1] units. The network sees the 128 x 128 frame; its rates are
    mapped back (resize by side / 128, crop the padding) so the warp acts on the slice itself and a
    zero interval returns the slice bit for bit."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    c = model.conditioning(torch.as_tensor([dx]), torch.tensor([float(age)]), torch.tensor([int(slice_index)])).to(device)
    u, r = model.rates(frame.to(device), c)
    ny, nx = shape
    side, size = max(ny, nx), frame.shape[-1]
    out = torch.cat([u * (side / size), r], dim=1).cpu()
    if side != size:
        out = F.interpolate(out, size=(side, side), mode="bilinear", align_corners=False)
    py, px = side - ny, side - nx
    out = out[:, :, py // 2: py // 2 + ny, px // 2: px // 2 + nx]
    return out[:, :2], out[:, 2:]


def flow_apply(x: np.ndarray, u: torch.Tensor, r: torch.Tensor, gap: float,
               weight: np.ndarray | None = None) -> np.ndarray:
    """y = clip(W(x; gap u) + gap r) on the slice grid; x (Y, X) in [0, 1] -> (Y, X) in [0, 1].

    ``weight`` (Y, X) in [0, 1] (:func:`geometry.brain_weight`): y <- x + weight (y - x), so the
    prediction keeps the baseline where the weight is 0 (outside the brain)."""
    from inbrainsyn.daninet.flow import SliceAgeingNet

    if gap == 0:  # y(a0) = x: no resampling round-off
        return np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))[None, None] * 2.0 - 1.0
    y = SliceAgeingNet.warp(xt, gap * u) + gap * r
    y = ((y.clamp(-1.0, 1.0) + 1.0) * 0.5)[0, 0].numpy().astype(np.float32)
    if weight is not None:
        x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
        y = (x + weight * (y - x)).astype(np.float32)
    return y


def flow_predictions(model, frame: torch.Tensor, x: np.ndarray, age: float, dx, slice_index: int,
                     targets, weight: np.ndarray | None = None) -> list[np.ndarray]:
    """The slice-ageing model's predictions (Y, X) in [0, 1], one per target age (rates computed once)."""
    u, r = flow_rates_on_slice(model, frame, x.shape, age, dx, slice_index)
    return [flow_apply(x, u, r, float(t) - float(age), weight) for t in targets]


def template_brain_mask() -> sitk.Image:
    """The shipped default bank's brain mask (the model's template grid), read from its file alone:
    importing and validating the whole bank costs a fresh preview process ~0.5 s."""
    import json

    from inbrainsyn.paths import resource_path

    root = resource_path("bank", "default")
    name = json.loads((root / "bank.json").read_text())["mask"]
    return sitk.ReadImage(str(root / name))


def blend_bins(g: torch.Tensor, age: float) -> torch.Tensor:
    """g(t) = sum_b m_b(t) g_b: (10, 1, S, S) -> (1, 1, S, S)."""
    m = torch.as_tensor(cond.age_membership(age), dtype=g.dtype)
    return (m[:, None, None, None] * g).sum(dim=0, keepdim=True)


def _quantile_map(source: np.ndarray, reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Monotone map taking the quantiles of ``source`` to those of ``reference``, applied to ``values``."""
    q = np.linspace(0.0, 1.0, 101)
    src, ref = np.quantile(source, q), np.quantile(reference, q)
    src = np.maximum.accumulate(src + np.arange(len(q)) * 1e-9)
    return np.interp(values, src, ref)


def assemble(x: np.ndarray, g0: np.ndarray, gt: np.ndarray, age: float, target: float, assembly: str) -> np.ndarray:
    """Prediction at ``target`` from x, g(a0), g(t), all (Y, X) in [0, 1]."""
    if assembly == "residual":
        delta = gt - g0
        if target > age:
            delta = np.minimum(delta, 0.0)
        elif target < age:
            delta = np.maximum(delta, 0.0)
        return np.clip(x + delta, 0.0, 1.0)
    if assembly == "blend":
        matched = _quantile_map(g0, x, gt)
        p = min(1.0, np.sqrt(abs(target - age) / 25.0))
        y = (1.0 - p) * x + p * matched
        if target > age:
            y = np.minimum(y, x)
        return np.clip(y, 0.0, 1.0)
    raise InputError(f"unknown assembly {assembly!r}; use one of {', '.join(ASSEMBLIES)}")


def check_native_slice(native_slice: int, native: sitk.Image, name: str = "input") -> int:
    """Validate an axial slice index K of the input's own grid (0 <= K < nz)."""
    if isinstance(native_slice, bool) or int(native_slice) != native_slice:
        raise InputError(f"native slice must be an integer, got {native_slice!r}")
    k, depth = int(native_slice), native.GetSize()[2]
    if not 0 <= k < depth:
        raise InputError(f"native slice {k} is outside {name} (it has axial slices 0 .. {depth - 1})")
    return k


def _native_slice_of_template_slice(j: float, native: sitk.Image, template: sitk.Image, transform: sitk.Transform) -> float:
    """Continuous native axial index of the centre of (continuous) template slice j, mapped by ``A``."""
    nx, ny, _ = template.GetSize()
    q = template.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2.0, (ny - 1) / 2.0, float(j)))
    return native.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(q))[2]


def template_slice_for_native_slice(native_slice: int, native: sitk.Image, template: sitk.Image,
                                    transform: sitk.Transform, band: tuple[int, int] | None = None,
                                    name: str = "input") -> int:
    """The template axial slice nearest to the input's axial slice K.

    ``transform`` is the affine ``A`` of the alignment, mapping template physical points to input
    physical points: ``A(q) = M q + t`` (read by :func:`inbrainsyn.native.affine_parts`). The
    centre of native slice K, ``p = index_to_physical(((nx-1)/2, (ny-1)/2, K))``, lies at template
    point ``q = M^-1 (p - t)``; the answer is ``round(k_q)`` with ``k_q`` the axial component of q's
    continuous template index. Raises InputError when K is outside the input, or when the mapped
    slice is outside the template grid or the model's trained ``band`` (naming the native slices
    that band covers, so the user can move the Red view there).
    """
    from inbrainsyn.native import affine_parts

    k = check_native_slice(native_slice, native, name)
    nx, ny, _ = native.GetSize()
    p = np.asarray(native.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2.0, (ny - 1) / 2.0, float(k))))
    matrix, offset = affine_parts(transform)
    q = np.linalg.solve(matrix, p - offset)
    j = int(np.floor(template.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in q))[2] + 0.5))
    depth = template.GetSize()[2]
    lo, hi = band if band is not None else (0, depth - 1)
    if not (max(lo, 0) <= j <= min(hi, depth - 1)):
        # native slices whose centres round into [lo, hi]: continuous template index in [lo - 1/2, hi + 1/2]
        ends = sorted(_native_slice_of_template_slice(b, native, template, transform) for b in (lo - 0.5, hi + 0.5))
        first, last = max(int(np.ceil(ends[0])), 0), min(int(np.floor(ends[1])), native.GetSize()[2] - 1)
        where = (f"native slices {first} .. {last} of {name}" if first <= last
                 else f"no slice of {name} (the band lies outside the scan)")
        raise InputError(
            f"native slice {k} of {name} maps to template slice {j}, outside the band {lo} .. {hi} the DaniNet "
            f"model was trained on (the template slices with enough brain to age; beyond them the slice holds "
            f"little or no brain); that band corresponds to {where}: move the axial view there")
    return j


def preview_slices(volume_in_template_space: np.ndarray | sitk.Image, slice_index: int, age: float, cohort: str,
                   targets, weights: str | Path | None = None, finetune_steps: int = 0,
                   model: DaniNet | None = None, assembly: str = "residual", device: torch.device | str = "cpu",
                   brain_mask: sitk.Image | None = None) -> dict:
    """Predict axial slice ``slice_index`` of a template-space volume at each target age.

    ``brain_mask``: the template's brain mask on the same grid (:func:`template_brain_mask`); the
    slice-ageing model's change is then kept within ``geometry.BRAIN_MARGIN_MM`` of it, so skull and
    scalp of an input with skull stay as they are (the CLI and the Slicer module pass it).

    Returns a dict with ``baseline`` (Y, X) and ``predictions`` (list of (Y, X), one per target),
    both in [0, 1] on the slice's own grid, plus ``bins`` (10, Y, X) (the generator's per-bin
    outputs), ``targets``, ``age``, ``cohort``, ``slice_index``, ``timings_s`` and the settings.
    """
    t0 = time.perf_counter()
    if assembly not in ASSEMBLIES:
        raise InputError(f"unknown assembly {assembly!r}; use one of {', '.join(ASSEMBLIES)}")
    vol = geometry.as_volume_array(volume_in_template_space, "volume in template space")
    targets = _check_targets(targets)
    age = float(age)
    if not np.isfinite(age) or not TARGET_AGE_RANGE[0] <= age <= TARGET_AGE_RANGE[1]:
        raise InputError(f"baseline age {age} is outside {TARGET_AGE_RANGE[0]:.0f}-{TARGET_AGE_RANGE[1]:.0f} years")
    dx = cond.diagnosis_class(cohort)
    if model is None:
        model = load_model(weights)
    grid = model.meta.get("grid_size_zyx")
    if grid is not None and tuple(vol.shape) != tuple(grid):
        raise InputError(f"volume shape {tuple(vol.shape)} is not the template grid {tuple(grid)} the DaniNet "
                         "model was trained on: bring the subject into template space first "
                         "(the CLI does it with an affine registration)")
    k = geometry.check_slice_index(slice_index, vol.shape[0], tuple(model.cfg.slice_band))
    vol = geometry.normalise_intensity(vol)
    x = vol[k]
    frame = geometry.to_frame(x[None], model.cfg.frame_size)
    t_load = time.perf_counter()
    if is_flow(model):
        if finetune_steps > 0:
            raise InputError("test-time transfer (--finetune-steps) applies to the adversarial DaniNet only; "
                             "the shipped slice-ageing model needs none")
        weight = None
        if brain_mask is not None:
            if not isinstance(brain_mask, sitk.Image):  # its spacing sets the margin in mm
                raise InputError("the brain mask must be a SimpleITK image on the template grid")
            shape = tuple(reversed(brain_mask.GetSize()))
            if shape != vol.shape:
                raise InputError(f"brain mask shape {shape} is not the volume's {vol.shape}")
            weight = geometry.brain_weight_on_slice(brain_mask, k)
        preds = flow_predictions(on_device(model, device), frame, x, age, dx, k, targets, weight)
        t_end = time.perf_counter()
        return {
            "baseline": x, "predictions": preds, "bins": None, "targets": targets, "age": age,
            "cohort": cohort, "diagnosis_class": cond.DIAGNOSIS_CLASSES[dx], "slice_index": k,
            "assembly": "flow", "finetune_steps": 0, "device": str(torch.device(device)),
            "timings_s": {"prepare": t_load - t0, "finetune": 0.0, "predict": t_end - t_load, "total": t_end - t0},
        }
    if finetune_steps > 0:
        from inbrainsyn.daninet.transfer import finetune

        lo, hi = model.cfg.slice_band
        ks = [j for j in range(k - 2, k + 3) if lo <= j <= hi]
        model = finetune(model, geometry.to_frame(vol[ks], model.cfg.frame_size), age, dx, np.array(ks), finetune_steps)
    t_ft = time.perf_counter()
    model = on_device(model, device)  # fine-tuning (above) runs on the CPU
    g = bin_outputs(model, frame, dx, k)
    g0 = geometry.from_frame(blend_bins(g, age), x.shape)[0]
    preds = [assemble(x, g0, geometry.from_frame(blend_bins(g, t), x.shape)[0], age, t, assembly) for t in targets]
    bins = geometry.from_frame(g, x.shape)
    t_end = time.perf_counter()
    return {
        "baseline": x, "predictions": preds, "bins": bins, "targets": targets, "age": age,
        "cohort": cohort, "diagnosis_class": cond.DIAGNOSIS_CLASSES[dx], "slice_index": k,
        "assembly": assembly, "finetune_steps": int(finetune_steps), "device": str(torch.device(device)),
        "timings_s": {"prepare": t_load - t0, "finetune": t_ft - t_load, "predict": t_end - t_ft, "total": t_end - t0},
    }


def _slice_image(array: np.ndarray, reference: sitk.Image | None, slice_index: int) -> sitk.Image:
    """A 2D image (Y, X) with the in-plane spacing/origin of axial slice k of ``reference``."""
    img = sitk.GetImageFromArray(array.astype(np.float32))
    if reference is not None:
        sx, sy, _ = reference.GetSpacing()
        img.SetSpacing((sx, sy))
        origin = reference.TransformIndexToPhysicalPoint((0, 0, int(slice_index)))
        img.SetOrigin(origin[:2])
        d = np.array(reference.GetDirection()).reshape(3, 3)
        img.SetDirection(tuple(d[:2, :2].ravel()))
    return img


def write_strip(result: dict, path: Path) -> None:
    """PNG strip: baseline and each target (top), change from baseline (bottom); see ``strip.py``."""
    from inbrainsyn import io
    from inbrainsyn.daninet.strip import write_strip_png

    labels = [f"baseline {result['age']:.1f} y"] + [f"{t:.1f} y" for t in result["targets"]]
    title = (f"DaniNet slice preview, slice {result['slice_index']}, {result['cohort']} "
             "(model trained on synthetic data)")
    with io.atomic_path(path) as tmp:
        write_strip_png(result["baseline"], result["predictions"], labels, title, tmp)


def write_preview(result: dict, outdir: str | Path, inputs: dict, parameters: dict, reference: sitk.Image | None = None,
                  overwrite: bool = False, extra_timings: dict | None = None, diagnostics: dict | None = None) -> Path:
    """Write slices (2D NIfTI), ``strip.png`` and ``manifest.json`` into ``outdir`` atomically.

    ``diagnostics``: the alignment used (``alignment.alignment_record``), so that a later preview of
    the same scan can reuse it (``--alignment OUTDIR/manifest.json``)."""
    from inbrainsyn import __version__, io

    k = result["slice_index"]
    with io.staged_output_dir(outdir, overwrite) as stage:
        outputs = []
        name = f"slice{k:03d}_baseline.nii.gz"
        io.write_image(_slice_image(result["baseline"], reference, k), stage / name)
        outputs.append({"kind": "baseline", "age": result["age"], "cohort": result["cohort"], "slice": k, "path": name})
        for t, pred in zip(result["targets"], result["predictions"]):
            name = f"slice{k:03d}_age{t:05.1f}.nii.gz"
            io.write_image(_slice_image(pred, reference, k), stage / name)
            outputs.append({"kind": "synthetic", "age": t, "cohort": result["cohort"], "slice": k, "path": name})
        write_strip(result, stage / "strip.png")
        outputs.append({"kind": "report", "path": "strip.png"})
        manifest = {
            "tool": "inbrainsyn", "command": "daninet preview", "version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": result.get("device", "cpu"),
            "inputs": {**inputs, "age": result["age"], "cohort": result["cohort"], "targets": result["targets"],
                       "slice": k},
            "parameters": {**parameters, "assembly": result["assembly"], "finetune_steps": result["finetune_steps"],
                           "diagnosis_class": result["diagnosis_class"]},
            "timings_s": {key: round(v, 4) for key, v in {**result["timings_s"], **(extra_timings or {})}.items()},
            "versions": {"inbrainsyn": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "SimpleITK": sitk.Version_VersionString()},
            "outputs": outputs,
            "note": "DaniNet slice preview from a model trained on synthetic (phantom) data; not for clinical use.",
        }
        if diagnostics:
            manifest["diagnostics"] = diagnostics
        io.write_json(manifest, stage / "manifest.json")
    return Path(outdir).absolute() / "manifest.json"
