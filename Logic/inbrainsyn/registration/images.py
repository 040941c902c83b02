"""SVF registration of SimpleITK images: geometry handled, results as ITK images.

:func:`register_images` resamples the moving image onto the fixed grid (through physical space,
identity transform) when the grids differ, refuses grids that do not overlap, runs
:func:`~inbrainsyn.registration.svf.register_svf` and attaches the fixed grid to the result so
that fields can be written as ITK displacement-field images (mm, LPS).
"""

from __future__ import annotations

import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.errors import InputError
from inbrainsyn.registration.affine import resample_to
from inbrainsyn.registration.svf import SVFRegistrationConfig, SVFRegistrationResult, register_svf


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image) -> float:
    """Fraction of the fixed grid's voxels whose physical point lies inside the moving image."""
    inside = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving)
    on_fixed = sitk.Resample(inside, fixed, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(on_fixed).mean())


def moving_on_fixed_grid(fixed: sitk.Image, moving: sitk.Image, moving_name: str = "moving") -> sitk.Image:
    """``moving`` resampled (linear) onto ``fixed``'s grid when the grids differ; refuses disjoint grids."""
    if fields.Grid.from_sitk(fixed).same_as(fields.Grid.from_sitk(moving)):
        return moving
    overlap = overlap_fraction(fixed, moving)
    if overlap == 0.0:
        raise InputError(
            f"{moving_name}: its grid does not overlap the fixed image in physical space "
            f"(origins {tuple(round(o, 1) for o in moving.GetOrigin())} vs {tuple(round(o, 1) for o in fixed.GetOrigin())} mm); "
            "bring it into the fixed image's space first (e.g. affine registration) or check the headers"
        )
    return resample_to(moving, fixed)


def register_images(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    config: SVFRegistrationConfig | None = None,
    device=None,
    seed: int = 0,
    progress=None,
    moving_name: str = "moving",
) -> SVFRegistrationResult:
    """SVF registration of two 3D scalar images; fields on the fixed grid (``result.grid``).

    ``fixed_mask`` may lie on another grid (it is resampled, nearest neighbour).  Anisotropic
    spacing is fine (smoothing is made isotropic in mm).
    """
    grid = fields.Grid.from_sitk(fixed)
    moving = moving_on_fixed_grid(fixed, moving, moving_name)
    mask = None
    if fixed_mask is not None:
        if not grid.same_as(fields.Grid.from_sitk(fixed_mask)):
            fixed_mask = sitk.Resample(fixed_mask, fixed, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0)
        mask = fields.image_to_tensor(fixed_mask) > 0
    result = register_svf(
        fields.image_to_tensor(fixed),
        fields.image_to_tensor(moving),
        spacing=grid.spacing,
        mask=mask,
        config=config,
        device=device,
        seed=seed,
        progress=progress,
    )
    result.grid = grid
    return result


def result_images(result: SVFRegistrationResult) -> dict[str, sitk.Image]:
    """``velocity``, ``displacement`` (ITK displacement fields, mm, LPS) and ``warped`` on the fixed grid."""
    grid = result.grid
    if grid is None:
        raise ValueError("result has no grid: use register_images, or set result.grid")
    return {
        "velocity": fields.field_to_sitk(result.velocity, grid),
        "displacement": fields.field_to_sitk(result.displacement, grid),
        "warped": fields.tensor_to_image(result.warped.to(torch.float32), grid),
    }
