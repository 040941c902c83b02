"""Rigid and affine (12 dof) registration with SimpleITK's registration framework.

Brings a scan (skull or not, any orientation, any contrast close to T1) into template space.
Transforms follow ITK: they map **fixed physical points to moving physical points**, so
``sitk.Resample(moving, fixed, transform)`` gives the moving image on the fixed grid.

Pipeline (all stages Mattes mutual information, so it tolerates different intensity scalings and
skull/no skull; multi-resolution levels at about 8, 4 and 2 mm with Gaussian smoothing in mm):

1. initialisation: centres of mass (image moments) aligned -- a translation;
2. rigid (6 dof, ``Euler3DTransform``);
3. affine (12 dof), started from the rigid result.

Speed: an affine map is fixed by coarse structure, so before the search both images are reduced
once to about the finest level's resolution by block averaging (``sitk.BinShrink``, integer factors,
physical space kept): ITK then builds its pyramid and evaluates the metric on images up to 8x
smaller than a 1 mm scan (the demo subject: 12 s -> 4 s of CPU; the result moves by 0.15-0.2 mm in
the brain, against 0.06 mm between two sampling seeds of the full-resolution search).

Deterministic: metric samples are drawn with a fixed seed and, with ``threads=1`` (the default),
ITK runs single-threaded, which makes results bit-identical between runs; more threads are faster
on an idle machine but change the result in the last digits (about 1e-5 mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from inbrainsyn.errors import ProcessingError


@dataclass
class AffineConfig:
    """Parameters of :func:`affine_register` (defaults suit 1-2 mm brain MRI)."""

    histogram_bins: int = 32
    sampling_fraction: float = 0.1  # fraction of fixed voxels used by the metric (random, seeded)
    # resolution of each level in mm (shrink factor = level / voxel size, at least 1): an affine map
    # is fixed by coarse structure, so 2 mm is the finest level even for a 1 mm scan (8x cheaper)
    level_spacings_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    shrink_factors: tuple[int, ...] | None = None  # explicit shrink factors (override level_spacings_mm)
    smoothing_mm: tuple[float, ...] = (4.0, 2.0, 1.0)
    rigid_iterations: int = 200
    affine_iterations: int = 200
    initialisation: str = "moments"  # "moments" (centres of mass) or "geometry" (image centres)
    rigid_only: bool = False
    threads: int = 1  # ITK threads during the registration (1: bit-identical results)
    # block-average both images once to about the finest level's resolution before the search
    reduce_to_finest_level: bool = True


def _cast(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32)


def reduced(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` block-averaged by integer factors to a voxel size of at most about ``spacing_mm``.

    Factor per axis ``floor(spacing_mm / voxel size)`` (1 leaves that axis as it is); BinShrink keeps
    the physical extent and position, so transforms found on the result hold for the original.
    """
    factors = [max(1, int(math.floor(spacing_mm / s + 1e-6))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _mask_on(mask: sitk.Image | None, reference: sitk.Image) -> sitk.Image | None:
    """A binary mask carried (nearest neighbour) onto a reduced image's grid."""
    if mask is None or mask.GetSize() == reference.GetSize():
        return mask
    return sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def initial_translation(fixed: sitk.Image, moving: sitk.Image, mode: str = "moments") -> sitk.Euler3DTransform:
    """Rigid transform that aligns the centres of mass ("moments") or grid centres ("geometry")."""
    flags = {
        "moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
        "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
    }
    if mode not in flags:
        raise ValueError(f"initialisation must be 'moments' or 'geometry', got {mode!r}")
    transform = sitk.CenteredTransformInitializer(_cast(fixed), _cast(moving), sitk.Euler3DTransform(), flags[mode])
    return sitk.Euler3DTransform(transform)


def shrink_factors(config: AffineConfig, fixed: sitk.Image) -> tuple[int, ...]:
    """Shrink factor per level: explicit, or level resolution / finest voxel size (at least 1)."""
    if config.shrink_factors is not None:
        return tuple(int(f) for f in config.shrink_factors)
    voxel = min(fixed.GetSpacing())
    return tuple(max(1, int(round(level / voxel))) for level in config.level_spacings_mm)


def _run(fixed, moving, transform, config: AffineConfig, iterations: int, fixed_mask, moving_mask, seed: int):
    """One multi-resolution Mattes-MI stage optimising ``transform`` in place."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # seed 0 means "wall clock" to SimpleITK: offset it so every seed is a fixed one
    method.SetMetricSamplingPercentage(config.sampling_fraction, 1 + int(seed))
    if fixed_mask is not None:
        method.SetMetricFixedMask(sitk.Cast(fixed_mask > 0, sitk.sitkUInt8))
    if moving_mask is not None:
        method.SetMetricMovingMask(sitk.Cast(moving_mask > 0, sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink_factors(config, fixed)))
    method.SetSmoothingSigmasPerLevel(list(config.smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.SetNumberOfThreads(config.threads)
    # The metric's internal filters follow ITK's global default thread count, not the method's.
    previous_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config.threads)
    try:
        method.Execute(fixed, moving)
    except RuntimeError as exc:
        raise ProcessingError(f"affine registration failed ({str(exc).strip().splitlines()[-1][:200]}); "
                              "check that both images show the same anatomy and overlap after centring") from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous_threads)
    return method.GetMetricValue()


def affine_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    config: AffineConfig | None = None,
    seed: int = 0,
) -> sitk.AffineTransform:
    """12-dof transform mapping fixed physical points to moving points (ITK convention).

    ``fixed_mask`` (e.g. the template's brain mask) restricts the metric to that region, which
    keeps skull and neck of the moving scan from pulling the fit.  Raises ``ProcessingError`` when
    the optimiser fails (e.g. no overlap).
    """
    config = config or AffineConfig()
    fixed_f, moving_f = _cast(fixed), _cast(moving)
    if config.reduce_to_finest_level and config.shrink_factors is None:
        finest = min(config.level_spacings_mm)
        fixed_f, moving_f = reduced(fixed_f, finest), reduced(moving_f, finest)
        fixed_mask, moving_mask = _mask_on(fixed_mask, fixed_f), _mask_on(moving_mask, moving_f)
    rigid = initial_translation(fixed_f, moving_f, config.initialisation)
    _run(fixed_f, moving_f, rigid, config, config.rigid_iterations, fixed_mask, moving_mask, seed)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    if not config.rigid_only:
        _run(fixed_f, moving_f, affine, config, config.affine_iterations, fixed_mask, moving_mask, seed)
    matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 0.2 or abs(np.linalg.det(matrix)) > 5.0:
        raise ProcessingError(f"affine registration diverged (determinant {np.linalg.det(matrix):.3g}); "
                              "check the input orientation and field of view")
    return affine


def resample_to(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                interpolator=sitk.sitkLinear, default_value: float | None = None) -> sitk.Image:
    """``moving`` on ``reference``'s grid through ``transform`` (identity by default).

    Points outside the moving image get ``default_value`` (the moving image's minimum by default).
    """
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(moving).min())
    return sitk.Resample(moving, reference, transform or sitk.Transform(3, sitk.sitkIdentity), interpolator,
                         default_value, moving.GetPixelID())


def matrix_and_offset(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, o)`` with ``T(p) = A p + o`` for an affine-family ITK transform (A = matrix, o = t + c - A c)."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    return matrix, translation + centre - matrix @ centre


def transform_error_mm(estimated: sitk.Transform, truth: sitk.Transform, reference: sitk.Image, mask: sitk.Image | None = None) -> np.ndarray:
    """Distances (mm) between where two affine transforms send the voxel centres of ``reference``.

    Only voxels of ``mask`` (on the reference grid) count when it is given.  1D array.
    """
    index = np.stack(np.meshgrid(*[np.arange(n) for n in reference.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    if mask is not None:
        inside = sitk.GetArrayViewFromImage(mask).transpose(2, 1, 0).reshape(-1) > 0
        index = index[inside]
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    points = np.asarray(reference.GetOrigin()) + (index * np.asarray(reference.GetSpacing())) @ direction.T
    (a1, o1), (a2, o2) = matrix_and_offset(estimated), matrix_and_offset(truth)
    return np.linalg.norm(points @ (a1 - a2).T + (o1 - o2), axis=1)
