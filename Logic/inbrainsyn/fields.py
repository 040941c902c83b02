"""Dense 3D transforms on a grid: THE warp convention of InBrainSyn.

Every other module calls this one to warp, compose, exponentiate or read/write fields.

Convention
----------
* **Pull-back warps**: ``warped(x) = moving(phi(x))`` with ``phi(x) = x + d(x)``.
* **In memory** an image is a tensor ``(Z, Y, X)`` (SimpleITK's array order) and a displacement or
  stationary velocity field (SVF) is a tensor ``(3, Z, Y, X)`` whose components are
  ``(x, y, z)`` = voxel index axes ``(i, j, k)``, **in voxel units** of its grid.
  Exponential, composition, Lie bracket and Jacobian determinant are invariant under the affine
  voxel-to-physical chart (``p = origin + D diag(s) idx``), so they are computed in voxel
  coordinates; physical units (mm) enter only at I/O (:func:`field_to_sitk`) and in regularisers.
* **On disk** a field is an ITK displacement-field image (3-component float32 vectors in physical
  mm, LPS; cast to 64-bit vectors for ``sitk.DisplacementFieldTransform``).  With ``tf = sitk.DisplacementFieldTransform(field_image)``,
  ``sitk.Resample(moving, reference, tf)`` gives ``moving(p + d_mm(p))`` -- the same pull-back;
  ``d_mm = D diag(spacing) d_vox``.
* **Composition**: ``compose(a, b) = phi_a o phi_b``, i.e. ``x -> x + b(x) + a(x + b(x))``.
  Warping by ``a`` then by ``b`` equals warping once by ``compose(a, b)``.
* **Lie bracket** (group / composition bracket, Bossa 2007, ITK): ``[a, b] = (Da) b - (Db) a``
  with ``(Da)_ij = da_i/dx_j``.  With it ``log(exp(a) o exp(b)) = a + b + 1/2 [a, b] + ...``
  The vector-field (Jacobi-Lie) bracket used by some authors is ``-[a, b]``.
* **Registration direction**: ``register(fixed, moving)`` returns v with ``moving o exp(v) ~ fixed``.

Boundary handling: fields and images are sampled with border replication outside the grid
(a displacement near the edge continues as it was), the usual choice for registration.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from inbrainsyn.errors import InputError

# --------------------------------------------------------------------------------------------
# Grid geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image grid in ITK physical space (LPS, mm).

    ``size`` is ``(nx, ny, nz)`` (ITK order); the tensor shape is ``(nz, ny, nx)``.
    ``direction`` is the 3x3 matrix whose columns are the index axes' unit vectors.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 numbers, row-major, as SimpleITK gives them

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Grid":
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size=tuple(int(n) for n in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Tensor shape ``(Z, Y, X)``."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_physical(self) -> np.ndarray:
        """3x3 matrix ``D diag(spacing)`` mapping a voxel-unit vector to mm (LPS)."""
        return self.direction_matrix @ np.diag(self.spacing)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry on ``image`` (sizes must agree)."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self) -> sitk.Image:
        """An empty image with this geometry, for ``sitk.Resample`` references."""
        return self.apply_to(sitk.Image(list(self.size), sitk.sitkUInt8))

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def voxel_coordinates(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity map: ``(3, Z, Y, X)`` tensor of voxel coordinates ``(x, y, z)``."""
    nz, ny, nx = shape
    z, y, x = torch.meshgrid(
        torch.arange(nz, device=device, dtype=dtype),
        torch.arange(ny, device=device, dtype=dtype),
        torch.arange(nx, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((x, y, z))


def _index_scale(shape, device, dtype) -> torch.Tensor:
    """Per-axis factors ``2 / (n - 1)`` mapping voxel units (x, y, z) to ``grid_sample``'s [-1, 1]."""
    nz, ny, nx = shape
    return torch.tensor(
        [2.0 / max(nx - 1, 1), 2.0 / max(ny - 1, 1), 2.0 / max(nz - 1, 1)], device=device, dtype=dtype
    )


@functools.lru_cache(maxsize=8)
def _identity_sampling_grid(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Identity map as a ``grid_sample`` grid ``(1, Z, Y, X, 3)`` in [-1, 1].

    Cached (a few grids of the shapes in use): rebuilding it on every warp cost a quarter of the time
    of a scaling-and-squaring exponential.  The cached tensor is never modified in place.
    """
    points = voxel_coordinates(shape, device, dtype).permute(1, 2, 3, 0)
    return (points * _index_scale(shape, device, dtype) - 1.0).unsqueeze(0)


# Fewer output points than this are sampled in one call (threads would cost more than they save).
PARALLEL_SAMPLING_POINTS = 1 << 16


def map_slabs(run, length: int, threads: int) -> list:
    """``[run(start, stop), ...]`` over ``threads`` contiguous slabs of ``range(length)``, each in a
    worker thread (torch and SciPy kernels release the GIL), results in slab order."""
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, length, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, bounds[:-1].tolist(), bounds[1:].tolist()))


def grid_sample_3d(values: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """``F.grid_sample(values, grid, align_corners=True)`` for ``values`` ``(1, C, Z, Y, X)`` and ``grid``
    ``(1, Zo, Yo, Xo, 3)``, on all of torch's CPU threads.

    PyTorch's 3D CPU kernel parallelises over the batch only, so one volume runs on one core.  Here
    the output points are cut into slabs (along the first output axis with enough planes), one per
    thread, each sampled by ``grid_sample`` in a worker thread (torch releases the GIL); every point
    is computed exactly as in one call, so the result is bit-identical (tested).  Used when there are
    at least :data:`PARALLEL_SAMPLING_POINTS` points on a CPU, with more than one thread, and
    nothing needs a gradient; otherwise one plain call.
    """
    threads = torch.get_num_threads()
    points = grid.shape[1] * grid.shape[2] * grid.shape[3]
    needs_grad = torch.is_grad_enabled() and (values.requires_grad or grid.requires_grad)
    axis = next((a for a in (1, 2, 3) if grid.shape[a] >= threads), None)
    if (threads < 2 or points < PARALLEL_SAMPLING_POINTS or grid.device.type != "cpu" or needs_grad
            or values.shape[0] != 1 or axis is None):
        return F.grid_sample(values, grid, mode=mode, padding_mode=padding_mode, align_corners=True)

    def run(start, stop):
        with torch.no_grad():  # grad mode is per thread; the kernel itself runs single-threaded for one volume
            return F.grid_sample(values, grid.narrow(axis, start, stop - start), mode=mode,
                                 padding_mode=padding_mode, align_corners=True)

    parts = map_slabs(run, grid.shape[axis], threads)
    return torch.cat(parts, dim=axis + 1)


def sample_at(values: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``values`` at ``x + displacement(x)``: the pull-back warp.

    values:       ``(C, Z, Y, X)`` or ``(Z, Y, X)`` on the same grid as ``displacement``.
    displacement: ``(3, Z, Y, X)`` in voxel units.
    mode:         ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (label maps).
    Returns a tensor of the same shape as ``values``.
    """
    squeeze = values.dim() == 3
    vals = values.unsqueeze(0) if squeeze else values
    shape = tuple(displacement.shape[1:])
    scale = _index_scale(shape, displacement.device, displacement.dtype)
    grid = _identity_sampling_grid(shape, displacement.device, displacement.dtype) + (
        displacement.permute(1, 2, 3, 0) * scale
    ).unsqueeze(0)
    out = grid_sample_3d(vals.unsqueeze(0).to(displacement.dtype), grid, mode=mode, padding_mode="border")[0]
    return out[0] if squeeze else out


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Pull-back warp of an image ``(Z, Y, X)`` (or ``(C, Z, Y, X)``) by ``phi = id + displacement``."""
    return sample_at(image, displacement, mode)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_outer o phi_inner``: ``x -> x + inner(x) + outer(x + inner(x))``.

    Both ``(3, Z, Y, X)`` voxel units.  Warping by ``outer`` then by ``inner`` equals warping by
    the result (pull-back order).
    """
    return inner + sample_at(outer, inner)


# --------------------------------------------------------------------------------------------
# Exponential of a stationary velocity field
# --------------------------------------------------------------------------------------------


def max_norm(field: torch.Tensor) -> float:
    """Largest vector length of a ``(3, Z, Y, X)`` field (voxel units)."""
    return float(torch.sqrt((field.detach() ** 2).sum(0)).max())


def squaring_steps(velocity: torch.Tensor, max_step: float = 0.25, max_steps: int = 20) -> int:
    """Number N of squarings so that ``|v| / 2^N <= max_step`` voxel (chosen from the field)."""
    largest = max_norm(velocity)
    if largest <= max_step:
        return 0
    return min(max_steps, int(math.ceil(math.log2(largest / max_step))))


def exp(velocity: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Group exponential by scaling and squaring: displacement of ``exp(v)``.

    ``exp(v)`` is the time-1 flow of ``dx/dt = v(x)``.  With ``v_0 = v / 2^N`` as a first-order
    approximation of ``exp(v / 2^N) - id``, squaring ``phi <- phi o phi`` N times gives ``exp(v)``.
    N defaults to :func:`squaring_steps` (first step at most 1/4 voxel).
    velocity: ``(3, Z, Y, X)`` voxel units.  Differentiable (registration back-propagates through it).
    """
    n = squaring_steps(velocity) if steps is None else int(steps)
    disp = velocity / (2.0**n)
    for _ in range(n):
        disp = compose(disp, disp)
    return disp


def inverse_exp(velocity: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Displacement of ``exp(v)^-1 = exp(-v)``."""
    return exp(-velocity, steps)


# Scaling and squaring starts from the first-order map id + v / 2^N, whose error grows like
# |v / 2^N| |Dv|; :func:`exp`'s default (first step <= 1/4 voxel) leaves ~10% relative error in
# conjugated maps on smooth test fields, 1/32 voxel brings it to the interpolation floor for the
# price of three more compositions.
ACCURATE_EXP_STEP_VOXELS = 1.0 / 32.0


def accurate_exp(velocity: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """:func:`exp` with a first squaring step of at most 1/32 voxel (unless ``steps``).

    The exponential of fields that are applied to images (transported ageing, conjugations);
    :func:`exp` (1/4 voxel) is the cheaper one that registration differentiates through.
    """
    if steps is None:
        steps = squaring_steps(velocity, max_step=ACCURATE_EXP_STEP_VOXELS)
    return exp(velocity, steps)


# --------------------------------------------------------------------------------------------
# Differential operators (central differences, one-sided at the border)
# --------------------------------------------------------------------------------------------


def spatial_gradient(field: torch.Tensor) -> torch.Tensor:
    """Jacobian matrix of a field: ``(C, Z, Y, X)`` -> ``(C, 3, Z, Y, X)``, entry ``[i, j] = d f_i / d x_j``.

    ``x_j`` runs over (x, y, z) = tensor dims (-1, -2, -3), voxel units.
    """
    d_dz, d_dy, d_dx = torch.gradient(field, dim=(-3, -2, -1))
    return torch.stack((d_dx, d_dy, d_dz), dim=1)


def jacobian_matrix(displacement: torch.Tensor) -> torch.Tensor:
    """``D phi = I + D d``: ``(3, 3, Z, Y, X)``."""
    jac = spatial_gradient(displacement)
    eye = torch.eye(3, device=displacement.device, dtype=displacement.dtype).view(3, 3, 1, 1, 1)
    return jac + eye


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """``det(I + D d)``, ``(Z, Y, X)``: local volume change of ``phi`` (same in voxel or mm units).

    Values below 1 mean the warped image's content at x comes from a smaller region: for a pull-back
    warp ``I o phi``, ``det < 1`` marks expansion of the anatomy at x, ``det > 1`` shrinkage.
    """
    j = jacobian_matrix(displacement)
    return (
        j[0, 0] * (j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1])
        - j[0, 1] * (j[1, 0] * j[2, 2] - j[1, 2] * j[2, 0])
        + j[0, 2] * (j[1, 0] * j[2, 1] - j[1, 1] * j[2, 0])
    )


def divergence(field: torch.Tensor) -> torch.Tensor:
    """``div v = sum_i d v_i / d x_i``, ``(Z, Y, X)``, voxel units."""
    jac = spatial_gradient(field)
    return jac[0, 0] + jac[1, 1] + jac[2, 2]


def directional_derivative(field: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``(D a) b``: ``(3, Z, Y, X)`` x ``(3, Z, Y, X)`` -> ``(3, Z, Y, X)``."""
    return torch.einsum("ij...,j...->i...", spatial_gradient(field), direction)


def lie_bracket(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Group (composition) bracket ``[a, b] = (Da) b - (Db) a`` -- the sign of ITK and METHODS §3.

    With this sign ``log(exp(a) o exp(b)) = a + b + 1/2 [a, b] + ...`` for our ``compose``.
    Shapes ``(3, Z, Y, X)``.
    """
    return directional_derivative(a, b) - directional_derivative(b, a)


def bch(a: torch.Tensor, b: torch.Tensor, order: int = 2) -> torch.Tensor:
    """Baker-Campbell-Hausdorff approximation of ``log(exp(a) o exp(b))``.

    order 1: ``a + b``; order 2: ``+ 1/2 [a, b]``; order 3: ``+ 1/12 ([a, [a, b]] + [b, [b, a]])``.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"BCH order must be 1, 2 or 3, got {order}")
    out = a + b
    if order >= 2:
        ab = lie_bracket(a, b)
        out = out + 0.5 * ab
        if order >= 3:
            out = out + (lie_bracket(a, ab) - lie_bracket(b, ab)) / 12.0
    return out


# --------------------------------------------------------------------------------------------
# Resolution changes
# --------------------------------------------------------------------------------------------


def resize_field(field: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample a ``(3, Z, Y, X)`` voxel-unit field to another grid of the same physical extent.

    The grids share corner voxel centres (``align_corners=True``), so each component is scaled by
    the ratio of (n - 1) along its axis to stay in the new grid's voxel units.
    """
    old = field.shape[1:]
    out = F.interpolate(field.unsqueeze(0), size=tuple(shape), mode="trilinear", align_corners=True)[0]
    # components (x, y, z) correspond to dims (-1, -2, -3)
    ratios = [
        (shape[2] - 1) / max(old[2] - 1, 1),
        (shape[1] - 1) / max(old[1] - 1, 1),
        (shape[0] - 1) / max(old[0] - 1, 1),
    ]
    return out * torch.tensor(ratios, dtype=out.dtype, device=out.device).view(3, 1, 1, 1)


# --------------------------------------------------------------------------------------------
# Conversions to and from ITK displacement-field images
# --------------------------------------------------------------------------------------------


def field_to_physical(displacement: torch.Tensor, grid: Grid) -> np.ndarray:
    """Voxel-unit field ``(3, Z, Y, X)`` -> numpy ``(Z, Y, X, 3)`` in mm (LPS): ``D diag(s) d``."""
    matrix = torch.as_tensor(grid.index_to_physical, dtype=torch.float64)
    d = displacement.detach().to("cpu", torch.float64)
    return torch.einsum("ij,j...->...i", matrix, d).numpy()


def field_from_physical(vectors_mm: np.ndarray, grid: Grid, dtype=torch.float32) -> torch.Tensor:
    """Numpy ``(Z, Y, X, 3)`` in mm (LPS) -> voxel-unit field ``(3, Z, Y, X)``."""
    inverse = torch.as_tensor(np.linalg.inv(grid.index_to_physical), dtype=torch.float64)
    d = torch.as_tensor(np.asarray(vectors_mm, dtype=np.float64))
    return torch.einsum("ij,...j->i...", inverse, d).to(dtype).contiguous()


# Fields are written as 32-bit float vectors: 7 significant digits (1e-7 mm on a 1 mm displacement,
# far below what any registration resolves) for half the bytes and writing time of float64.
# ``sitk.DisplacementFieldTransform`` wants 64-bit vectors: ``sitk.Cast(image, sitk.sitkVectorFloat64)``.
FIELD_PIXEL_TYPE = sitk.sitkVectorFloat32


def field_to_sitk(displacement: torch.Tensor, grid: Grid, pixel_type: int = FIELD_PIXEL_TYPE) -> sitk.Image:
    """ITK displacement-field image (float32 vectors by default, mm, LPS) of a voxel-unit field.

    Pass ``pixel_type=sitk.sitkVectorFloat64`` for an image to build a ``DisplacementFieldTransform`` from.
    """
    vectors = field_to_physical(displacement, grid)
    if pixel_type == sitk.sitkVectorFloat32:
        vectors = vectors.astype(np.float32)
    elif pixel_type != sitk.sitkVectorFloat64:
        raise ValueError("a field image is sitkVectorFloat32 or sitkVectorFloat64")
    image = sitk.GetImageFromArray(vectors, isVector=True)
    return grid.apply_to(image)


def field_from_sitk(image: sitk.Image, name: str = "field", dtype=torch.float32) -> tuple[torch.Tensor, Grid]:
    """Read an ITK displacement-field image back into a voxel-unit field and its grid.

    Raises ``ValueError`` naming ``name`` when the image is not a 3D field of 3-vectors.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"{name}: a displacement field must be 3D, this image is {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(
            f"{name}: a displacement field needs 3 vector components per voxel (x, y, z in mm), "
            f"this image has {image.GetNumberOfComponentsPerPixel()}"
        )
    grid = Grid.from_sitk(image)
    vectors = sitk.GetArrayFromImage(image)
    return field_from_physical(vectors, grid, dtype), grid


def image_to_tensor(image: sitk.Image, dtype=torch.float32) -> torch.Tensor:
    """Scalar SimpleITK image -> ``(Z, Y, X)`` tensor."""
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32, copy=False)).to(dtype)


def tensor_to_image(tensor: torch.Tensor, grid: Grid, pixel_type: int | None = None) -> sitk.Image:
    """``(Z, Y, X)`` tensor -> SimpleITK image on ``grid`` (optionally cast to ``pixel_type``)."""
    image = grid.apply_to(sitk.GetImageFromArray(tensor.detach().cpu().numpy()))
    return sitk.Cast(image, pixel_type) if pixel_type is not None else image


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; ``"cuda"`` raises if no GPU is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)
