"""Axial slices of a template-space volume <-> the 128x128 frame DaniNet works in.

A volume in template space is an array ``(Z, Y, X)`` (SimpleITK order); axial slice k is
``volume[k]``, shape ``(Y, X)``. The model frame is a square ``S x S`` image (S = 128):
the slice is zero-padded, centred, to a square of side ``L = max(Y, X)`` and resized
bilinearly to S x S; :func:`from_frame` undoes both steps. Intensities: the engine works in
[0, 1]; the networks in [-1, 1] (``x_net = 2 x - 1``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from inbrainsyn.errors import InputError

FRAME_SIZE = 128


def as_volume_array(volume: np.ndarray | sitk.Image, what: str = "volume") -> np.ndarray:
    """A 3D float32 array (Z, Y, X) from an array or a SimpleITK image; clear error otherwise."""
    if isinstance(volume, sitk.Image):
        if volume.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{what} must be a scalar image, it has "
                             f"{volume.GetNumberOfComponentsPerPixel()} components per voxel")
        arr = sitk.GetArrayFromImage(volume)
    else:
        arr = np.asarray(volume)
    if arr.ndim != 3:
        raise InputError(f"{what} must be a 3D volume (Z, Y, X), got {arr.ndim}D shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} contains NaN or infinite values")
    return arr


def normalise_intensity(volume: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Map a volume to [0, 1]: ``clip(v / P, 0, 1)`` with P the given percentile of v > 0.

    A volume already in [0, 1] (the engine's convention) is returned unchanged, so that
    follow-ups keep the intensity scale of their baseline. Shape preserved.
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.min() >= -1e-6 and v.max() <= 1.0 + 1e-6:
        return np.clip(v, 0.0, 1.0)
    positive = v[v > 0]
    if positive.size == 0:
        raise InputError("volume has no positive intensity: is it empty?")
    scale = float(np.percentile(positive, percentile))
    return np.clip(v / scale, 0.0, 1.0).astype(np.float32)


def check_slice_index(slice_index: int, depth: int, band: tuple[int, int] | None = None) -> int:
    """Validate an axial slice index against the volume depth and the model's trained band."""
    if isinstance(slice_index, bool) or int(slice_index) != slice_index:
        raise InputError(f"slice index must be an integer, got {slice_index!r}")
    k = int(slice_index)
    if not 0 <= k < depth:
        raise InputError(f"slice index {k} is outside the volume (0 .. {depth - 1} axial slices)")
    if band is not None and not band[0] <= k <= band[1]:
        raise InputError(
            f"slice index {k} is outside the band the DaniNet model was trained on "
            f"({band[0]} .. {band[1]}, the template slices with enough brain to age: at least 20 % of the "
            f"largest slice's brain area for the shipped model); choose a slice in that band"
        )
    return k


def to_frame(slices: np.ndarray | torch.Tensor, size: int = FRAME_SIZE) -> torch.Tensor:
    """(N, Y, X) slices in [0, 1] -> (N, 1, size, size) frame in [-1, 1] (pad square, resize)."""
    t = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    if t.ndim == 2:
        t = t[None]
    n, ny, nx = t.shape
    side = max(ny, nx)
    py, px = side - ny, side - nx
    t = F.pad(t[:, None], (px // 2, px - px // 2, py // 2, py - py // 2))
    if side != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return t.clamp(0.0, 1.0) * 2.0 - 1.0


def from_frame(frame: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(N, 1, S, S) frame in [-1, 1] -> (N, Y, X) slices in [0, 1] on the original slice grid."""
    ny, nx = shape
    side = max(ny, nx)
    t = (frame.detach().float().clamp(-1.0, 1.0) + 1.0) * 0.5
    if t.shape[-1] != side:
        t = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)
    py, px = side - ny, side - nx
    t = t[:, 0, py // 2: py // 2 + ny, px // 2: px // 2 + nx]
    return t.numpy().astype(np.float32)


def grid_geometry(image: sitk.Image) -> dict:
    """``{"spacing", "origin", "direction"}`` of an image as lists (ITK x, y, z order), for model metadata."""
    return {"spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


# The preview changes a slice only within this distance of the template's brain mask (mm). The
# shipped bank's mask already holds a 5 mm shell of extra-cerebral CSF around the MNI brain, where
# ageing widens the sulci; beyond it lie skull and scalp, which must stay as they are (a model trained
# on skull-stripped slices reads the scalp as an outer cortex and "ages" it: on the demo subject with
# skull, 3-9 mm outside the mask, the 70 -> 85 y change averaged 0.08-0.19 of the intensity range).
# One voxel of margin absorbs the affine's misplacement; the weight then falls linearly to 0.
BRAIN_MARGIN_MM = 1.5
BRAIN_RAMP_MM = 1.5


def brain_weight(mask_slice: np.ndarray, spacing_mm: tuple[float, float], margin_mm: float = BRAIN_MARGIN_MM,
                 ramp_mm: float = BRAIN_RAMP_MM) -> np.ndarray:
    """Where a prediction may differ from the baseline: (Y, X) mask slice -> (Y, X) weight in [0, 1].

    w(p) = clip((margin + ramp - d(p)) / ramp, 0, 1), d(p) the in-plane distance (mm) from p to the
    mask (0 inside); ``spacing_mm`` is the slice's (row, column) pixel size.
    """
    from scipy import ndimage

    inside = np.asarray(mask_slice) > 0.5
    if not inside.any():
        return np.zeros(inside.shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~inside, sampling=tuple(float(v) for v in spacing_mm))
    return np.clip((margin_mm + ramp_mm - distance) / ramp_mm, 0.0, 1.0).astype(np.float32)


def brain_weight_on_slice(mask: sitk.Image, slice_index: int) -> np.ndarray:
    """:func:`brain_weight` of axial slice ``slice_index`` of a mask image on the template grid, with
    the slice's own pixel size (rows are ITK's y, columns its x): (Y, X) weight in [0, 1]."""
    sx, sy = mask.GetSpacing()[:2]
    return brain_weight(sitk.GetArrayViewFromImage(mask)[slice_index], (sy, sx))
