"""Known-deformation registration problems on real anatomy, and the metrics to score them.

Used by the tests and ``benchmarks/bench_registration.py``.  The fixed image is the MNI152 2009a
T1 (already brain-extracted in the nilearn distribution); the moving image is the same brain
deformed by a known smooth diffeomorphism, so the registration's answer is known exactly:

* ``v_true``: Gaussian-smoothed white noise (sigma ``smoothness_mm``), scaled so that its largest
  vector is ``max_displacement_mm``; ``d_true = exp(v_true)`` cannot fold.
* ``moving = fixed o exp(-v_true)``, hence ``moving o exp(v_true) = fixed``: the registration
  ``register(fixed, moving)`` should return ``d ~ d_true`` (fixed points -> moving points,
  pull-back convention of :mod:`inbrainsyn.fields`).
* Endpoint error ``|d - d_true|`` in mm inside the brain mask; Dice of the GM and WM maps
  (probability > 0.5) of the fixed image vs the moving image's maps warped by ``d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from inbrainsyn import fields

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def load_mni(folder: str | Path, spacing_mm: float = 1.0) -> dict[str, sitk.Image]:
    """MNI152 T1, GM and WM (float32, GM/WM as probabilities in [0, 1]) and a brain mask.

    ``spacing_mm`` 1 keeps the native 1 mm grid; an integer ``k`` > 1 averages k^3 blocks
    (``BinShrink``, an anti-aliased downsampling).  Brain mask: T1 > 0 (the nilearn T1 is skull
    stripped) with interior holes filled.
    """
    folder = Path(folder)
    images = {key: sitk.Cast(sitk.ReadImage(str(folder / name)), sitk.sitkFloat32) for key, name in MNI_FILES.items()}
    images["gm"] = images["gm"] / 255.0
    images["wm"] = images["wm"] / 255.0
    factor = int(round(spacing_mm))
    if factor > 1:
        images = {key: sitk.BinShrink(image, [factor] * 3) for key, image in images.items()}
    images["mask"] = sitk.BinaryFillhole(sitk.Cast(images["t1"] > 0, sitk.sitkUInt8))
    return images


def smooth_random_svf(shape, spacing_zyx, max_displacement_mm: float, smoothness_mm: float, seed: int) -> torch.Tensor:
    """Smooth random SVF ``(3, Z, Y, X)`` in voxel units whose largest vector is ``max_displacement_mm``."""
    rng = np.random.default_rng(seed)
    sigma_vox = [smoothness_mm / s for s in spacing_zyx]
    components = [gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap") for _ in range(3)]
    mm = np.stack(components)  # (x, y, z) components in mm
    mm *= max_displacement_mm / np.sqrt((mm**2).sum(0)).max()
    to_voxels = np.array([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]]).reshape(3, 1, 1, 1)
    return torch.from_numpy(mm / to_voxels).float()


@dataclass
class KnownDeformationPair:
    """A registration problem with a known answer (tensors ``(Z, Y, X)``, fields ``(3, Z, Y, X)``)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor
    gm_fixed: torch.Tensor
    wm_fixed: torch.Tensor
    gm_moving: torch.Tensor
    wm_moving: torch.Tensor
    true_displacement: torch.Tensor  # exp(v_true): moving o (id + d_true) = fixed
    grid: fields.Grid

    @property
    def spacing(self):
        return self.grid.spacing


def make_known_pair(images: dict[str, sitk.Image], max_displacement_mm: float = 5.0, smoothness_mm: float = 16.0, seed: int = 0) -> KnownDeformationPair:
    """Build ``moving = fixed o exp(-v_true)`` from :func:`load_mni` images (see module docstring)."""
    grid = fields.Grid.from_sitk(images["t1"])
    spacing_zyx = tuple(reversed(grid.spacing))
    v_true = smooth_random_svf(grid.shape, spacing_zyx, max_displacement_mm, smoothness_mm, seed)
    d_true = fields.exp(v_true)
    d_inverse = fields.exp(-v_true)
    t = {key: fields.image_to_tensor(images[key]) for key in ("t1", "gm", "wm", "mask")}
    return KnownDeformationPair(
        fixed=t["t1"],
        moving=fields.warp(t["t1"], d_inverse),
        mask=t["mask"] > 0,
        gm_fixed=t["gm"],
        wm_fixed=t["wm"],
        gm_moving=fields.warp(t["gm"], d_inverse),
        wm_moving=fields.warp(t["wm"], d_inverse),
        true_displacement=d_true,
        grid=grid,
    )


def endpoint_error_mm(displacement: torch.Tensor, truth: torch.Tensor, grid: fields.Grid, mask: torch.Tensor) -> torch.Tensor:
    """``|d - d_true|`` in mm at the voxels of ``mask`` (1D tensor)."""
    scale = torch.tensor(grid.spacing, dtype=displacement.dtype).view(3, 1, 1, 1)  # (x, y, z) mm per voxel
    error = torch.sqrt((((displacement - truth) * scale) ** 2).sum(0))
    return error[mask]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice overlap of two boolean maps."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def score(pair: KnownDeformationPair, displacement: torch.Tensor) -> dict[str, float]:
    """EPE (mean, 95th percentile, max, mm, in the brain), GM/WM Dice and folding of ``displacement``."""
    epe = endpoint_error_mm(displacement, pair.true_displacement, pair.grid, pair.mask)
    gm = fields.warp(pair.gm_moving, displacement) > 0.5
    wm = fields.warp(pair.wm_moving, displacement) > 0.5
    det = fields.jacobian_determinant(displacement)
    return {
        "epe_mean_mm": float(epe.mean()),
        "epe_p95_mm": float(torch.quantile(epe[:: max(1, epe.numel() // 1_000_000)], 0.95)),
        "epe_max_mm": float(epe.max()),
        "dice_gm": dice(gm, pair.gm_fixed > 0.5),
        "dice_wm": dice(wm, pair.wm_fixed > 0.5),
        "folding_fraction": float((det <= 0).float().mean()),
        "min_jacobian": float(det.min()),
    }
