"""Separable linear operators on 3D grids: crop, blur, decimate, upsample and box filters.

Every resampling step of the registration pyramid is linear and separable along the three axes,
so it is applied as three small dense matrices: ``out = Mz . (My . (x . Mx^T))``.  On a CPU this
runs on BLAS and is several times faster than ``conv3d``/``avg_pool3d``/``interpolate``, and it
lets a crop, an anti-aliasing blur, a decimation and the border rule be fused into one pass.

Conventions
-----------
* Tensors are ``(C, Z, Y, X)``; a matrix for an axis has shape ``(n_out, n_in)``.
* Border rule: replication (indices outside ``[0, n_in - 1]`` are clamped), the rule
  :mod:`inbrainsyn.fields` uses for sampling.  So a crop box may extend beyond the image.
* Nested grids: a coarse grid with factor ``f`` relative to a fine one has voxel ``i`` at fine
  index ``start + f * i`` (voxel centres coincide, as with ``align_corners=True``), so the coarse
  and fine grid cover the same extent when ``(n_fine - 1) = f * (n_coarse - 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _scatter_clamped(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """Dense ``(n_out, n_in)`` matrix with ``weights`` accumulated at ``(rows, clamp(cols))``."""
    matrix = torch.zeros((n_out, n_in), dtype=torch.float64)
    matrix.index_put_((rows, cols.clamp(0, n_in - 1)), weights, accumulate=True)
    return matrix


def linear_matrix(positions: torch.Tensor, n_in: int) -> torch.Tensor:
    """Linear interpolation at fractional ``positions`` (``(n_out,)``, input voxel units), clamped."""
    positions = positions.to(torch.float64).clamp(0, n_in - 1)
    lower = positions.floor().long().clamp(max=max(n_in - 2, 0))
    frac = positions - lower
    rows = torch.arange(len(positions))
    matrix = _scatter_clamped(rows, lower, 1.0 - frac, len(positions), n_in)
    matrix += _scatter_clamped(rows, lower + 1, frac, len(positions), n_in)
    return matrix


def gaussian_matrix(centres: torch.Tensor, n_in: int, sigma: float) -> torch.Tensor:
    """Gaussian-weighted average around integer ``centres`` (input voxels), rows summing to 1.

    ``sigma`` in input voxels; 0 gives plain selection (a crop).  Truncated at 3 sigma.
    """
    centres = centres.long()
    if sigma <= 0:
        return _scatter_clamped(torch.arange(len(centres)), centres, torch.ones(len(centres), dtype=torch.float64), len(centres), n_in)
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1)
    kernel = torch.exp(-0.5 * (offsets.to(torch.float64) / sigma) ** 2)
    kernel /= kernel.sum()
    rows = torch.arange(len(centres)).repeat_interleave(len(offsets))
    cols = (centres[:, None] + offsets[None, :]).reshape(-1)
    return _scatter_clamped(rows, cols, kernel.repeat(len(centres)), len(centres), n_in)


def box_matrix(n: int, window: int) -> torch.Tensor:
    """Mean over ``window`` neighbours, averaging only voxels inside the grid (unbiased at borders)."""
    idx = torch.arange(n)
    inside = (idx[:, None] - idx[None, :]).abs() <= window // 2
    matrix = inside.to(torch.float64)
    return matrix / matrix.sum(1, keepdim=True)


def apply_separable(volumes: torch.Tensor, matrices) -> torch.Tensor:
    """``(C, Z, Y, X)`` -> ``(C, Z', Y', X')`` with one ``(n_out, n_in)`` matrix per axis ``(Mz, My, Mx)``.

    The axis that shrinks most is processed first to keep the intermediate results small.
    """
    mz, my, mx = (m.to(volumes.device, volumes.dtype) for m in matrices)
    out = volumes

    def along_x(t):
        return torch.matmul(t, mx.T)

    def along_y(t):
        return torch.matmul(my, t)

    def along_z(t):
        c, z, y, x = t.shape
        return torch.matmul(mz, t.reshape(c, z, y * x)).reshape(c, mz.shape[0], y, x)

    steps = sorted(
        ((mz.shape[0] / mz.shape[1], along_z), (my.shape[0] / my.shape[1], along_y), (mx.shape[0] / mx.shape[1], along_x)),
        key=lambda item: item[0],
    )
    for _, step in steps:
        out = step(out)
    return out


def nested_upsample(volumes: torch.Tensor, shape) -> torch.Tensor:
    """Linear upsampling of ``(C, Z, Y, X)`` to the nested finer grid ``shape`` (see Conventions).

    Requires ``(n_out - 1) = f * (n_in - 1)`` along every axis for an integer ``f``, where output
    voxel ``i`` lies at input position ``i / f``: the same operator as :func:`apply_separable` with
    :func:`linear_matrix` ``(arange(n_out) / f)`` (to float rounding), but with 8 taps per output
    voxel instead of three dense products (measured 5x faster for 2x upsampling of a 1 mm
    registration's velocity: 30 vs 150 ms).
    """
    for n_out, n_in in zip(shape, volumes.shape[1:]):
        if n_in < 2 or (n_out - 1) % (n_in - 1) != 0:
            raise ValueError(f"grid of {tuple(shape)} voxels is not nested in {tuple(volumes.shape[1:])}")
    return F.interpolate(volumes.unsqueeze(0), size=tuple(shape), mode="trilinear", align_corners=True)[0]


def box_mean(volumes: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a ``window``^3 cube of each channel of ``(C, Z, Y, X)``.

    Separable running sums by shifted in-place additions (``window`` additions per axis), divided
    by the number of in-grid neighbours, so the mean is unbiased at the border (equal to
    :func:`apply_separable` with :func:`box_matrix`, but 2-3x faster for small windows).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"box window must be an odd number of voxels >= 1, got {window}")
    half = window // 2
    out = volumes
    for dim in (1, 2, 3):
        n = out.shape[dim]
        total = out.clone()
        for shift in range(1, min(half, n - 1) + 1):
            total.narrow(dim, 0, n - shift).add_(out.narrow(dim, shift, n - shift))
            total.narrow(dim, shift, n - shift).add_(out.narrow(dim, 0, n - shift))
        idx = torch.arange(n, device=volumes.device)
        counts = (torch.clamp(idx + half, max=n - 1) - torch.clamp(idx - half, min=0) + 1).to(volumes.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = n
        out = total.div_(counts.view(shape))
    return out


def gaussian_smooth(volumes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of each channel of ``(C, Z, Y, X)``, ``sigma`` in voxels, border replicated."""
    if sigma <= 0:
        return volumes
    return apply_separable(volumes, [gaussian_matrix(torch.arange(n), n, sigma) for n in volumes.shape[1:]])
