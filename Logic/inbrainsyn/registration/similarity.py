"""Image similarity measures for registration: local normalised cross-correlation and MSE.

All functions take tensors ``(Z, Y, X)`` on the same grid (the fixed image and the warped moving
image) and an optional weight map ``(Z, Y, X)`` in [0, 1] (a brain mask), and return a scalar
*loss* (lower is better) that is differentiable with respect to the warped image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inbrainsyn.registration.pyramid import box_mean

# Guards against 0/0 in flat regions.  Intensities are normalised to about [0, 1], where textured
# tissue has local variances of 1e-3 to 1e-2; 1e-4 keeps near-constant background (interpolation
# residue, variance ~1e-12) from producing arbitrary correlations and forces.
_LNCC_EPS = 1e-4


def lncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Squared local normalised cross-correlation per voxel, ``(Z, Y, X)`` in [0, 1].

    With local means ``mu`` over the window,
    ``cc(x) = cov(I, J)^2 / ((var(I) + eps) (var(J) + eps))`` where ``cov = mu(IJ) - mu(I) mu(J)`` and
    ``var(I) = mu(I^2) - mu(I)^2`` (the form used by ANTs' CC metric and VoxelMorph).
    It is invariant to local affine intensity changes, so it tolerates bias fields and scanner
    differences between same-modality images.
    """
    i, j = fixed, warped
    means = box_mean(torch.stack((i, j, i * i, j * j, i * j)), window)
    mu_i, mu_j, mu_ii, mu_jj, mu_ij = means
    cov = mu_ij - mu_i * mu_j
    var_i = (mu_ii - mu_i * mu_i).clamp_min(0.0) + _LNCC_EPS
    var_j = (mu_jj - mu_j * mu_j).clamp_min(0.0) + _LNCC_EPS
    return cov * cov / (var_i * var_j)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum(w v) / sum(w)``, or the plain mean when ``weights`` is None."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1e-8)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, window: int = 7) -> torch.Tensor:
    """``1 - mean(cc)`` over the mask: 0 for a perfect local linear match, up to 1."""
    return 1.0 - weighted_mean(lncc_map(fixed, warped, window), mask)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference over the mask (same contrast and scaling assumed)."""
    return weighted_mean((fixed - warped) ** 2, mask)


SIMILARITIES = ("lncc", "mse")


def similarity_loss(name: str, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, window: int = 7) -> torch.Tensor:
    """Dispatch on ``name`` in :data:`SIMILARITIES`."""
    if name == "lncc":
        return lncc_loss(fixed, warped, mask, window)
    if name == "mse":
        return mse_loss(fixed, warped, mask)
    raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")


@dataclass(frozen=True)
class LocalStatistics:
    """Local mean and variance of one image over a ``window``^3 cube, each ``(Z, Y, X)``.

    The fixed image's half of the LNCC moments: it does not change while the moving image is
    warped, so a registration level computes it once (:func:`local_statistics`) instead of box
    filtering ``I`` and ``I^2`` again at every iteration (2 of the 5 box-filtered maps).
    ``variance`` includes the ``eps`` guard.  Treat as read-only.
    """

    mean: torch.Tensor
    centred: torch.Tensor  # image - mean
    variance: torch.Tensor  # var(image) + eps
    window: int


def local_statistics(image: torch.Tensor, window: int) -> LocalStatistics:
    """:class:`LocalStatistics` of ``image`` ``(Z, Y, X)`` (same arithmetic as :func:`_local_moments`)."""
    mu, mu_sq = box_mean(torch.stack((image, image * image)), window)
    variance = mu_sq.sub_(mu * mu).clamp_min_(0.0).add_(_LNCC_EPS)
    return LocalStatistics(mean=mu, centred=image - mu, variance=variance, window=window)


def _local_moments(fixed: torch.Tensor, warped: torch.Tensor, window: int, fixed_stats: LocalStatistics | None = None):
    """Local means over the window: ``(mu_I, mu_J, A = cov, B = var I + eps, C = var J + eps)``.

    With ``fixed_stats`` (of ``fixed``, same window) only ``J``, ``J^2`` and ``IJ`` are box filtered;
    ``mu_I`` and ``B`` are then the cached tensors, which callers must not modify in place.
    """
    if fixed_stats is not None:
        if fixed_stats.window != window or fixed_stats.mean.shape != fixed.shape:
            raise ValueError("fixed_stats were computed for another window or grid")
        stacked = torch.empty((3, *fixed.shape), dtype=fixed.dtype, device=fixed.device)
        stacked[0] = warped
        torch.mul(warped, warped, out=stacked[1])
        torch.mul(fixed, warped, out=stacked[2])
        mu_j, mu_jj, mu_ij = box_mean(stacked, window)
        mu_i, var_i = fixed_stats.mean, fixed_stats.variance
    else:
        stacked = torch.empty((5, *fixed.shape), dtype=fixed.dtype, device=fixed.device)
        stacked[0] = fixed
        stacked[1] = warped
        torch.mul(fixed, fixed, out=stacked[2])
        torch.mul(warped, warped, out=stacked[3])
        torch.mul(fixed, warped, out=stacked[4])
        mu_i, mu_j, mu_ii, mu_jj, mu_ij = box_mean(stacked, window)
        var_i = mu_ii.sub_(mu_i * mu_i).clamp_min_(0.0).add_(_LNCC_EPS)
    cov = mu_ij.sub_(mu_i * mu_j)
    var_j = mu_jj.sub_(mu_j * mu_j).clamp_min_(0.0).add_(_LNCC_EPS)
    return mu_i, mu_j, cov, var_i, var_j


def lncc_value_map(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7,
                   fixed_stats: LocalStatistics | None = None) -> torch.Tensor:
    """Same as :func:`lncc_map` with in-place arithmetic (no autograd), ``(Z, Y, X)``."""
    _, _, a, b, c = _local_moments(fixed, warped, window, fixed_stats)
    return (a * a).div_(c.mul_(b))


def lncc_with_derivative(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7,
                         fixed_stats: LocalStatistics | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared LNCC map and its pointwise derivative with respect to the warped image.

    With ``A = cov``, ``B = var(I)``, ``C = var(J)`` (local, see :func:`lncc_map`) and the local
    means held fixed -- the approximation of ANTs' CC metric -- ::

        d cc(x) / d J(x)  ~  2 A / (B C) * ((I - mu_I) - (A / C) (J - mu_J))

    (up to the constant 1/window^3, absorbed by the step normalisation of the optimiser).
    Returns ``(cc, dcc_dJ)``, both ``(Z, Y, X)``.  Costs one separable box pass over 5 maps
    (3 with the fixed image's cached ``fixed_stats``), about a third of an autograd forward +
    backward pass.  No autograd (in-place arithmetic on temporaries only).
    """
    mu_i, mu_j, a, b, c = _local_moments(fixed, warped, window, fixed_stats)
    centred_i = fixed_stats.centred if fixed_stats is not None else fixed - mu_i
    a_over_c = a / c
    bc = c.mul_(b)
    cc = (a * a).div_(bc)
    centred = torch.sub(centred_i, (warped - mu_j).mul_(a_over_c))
    derivative = centred.mul_(a).div_(bc).mul_(2.0)
    return cc, derivative


def lncc_with_derivatives(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7):
    """Squared LNCC map and its pointwise derivatives with respect to both images.

    Returns ``(cc, dcc_dJ, dcc_dI)``: the derivative with respect to ``warped`` (J) as in
    :func:`lncc_with_derivative` and, by the symmetry of ``cc`` in I and J, with respect to
    ``fixed`` (I): ``2 A / (B C) * ((J - mu_J) - (A / B) (I - mu_I))``.  For the symmetric
    (middle-space) registration, where both images are warped.
    """
    mu_i, mu_j, a, b, c = _local_moments(fixed, warped, window)
    a_over_c = a / c
    a_over_b = a / b
    bc = b.mul_(c)
    cc = (a * a).div_(bc)
    scale = (2.0 * a).div_(bc)
    centred_i = fixed - mu_i
    centred_j = warped - mu_j
    d_j = (centred_i - centred_j * a_over_c).mul_(scale)
    d_i = centred_j.sub_(centred_i.mul_(a_over_b)).mul_(scale)
    return cc, d_j, d_i


def mse_with_derivative(fixed: torch.Tensor, warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared difference map and the derivative of ``-(I - J)^2`` w.r.t. J: ``2 (I - J)``."""
    diff = fixed - warped
    return diff * diff, 2.0 * diff
