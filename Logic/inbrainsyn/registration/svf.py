"""Pairwise deformable registration by instance optimisation of a stationary velocity field.

No trained network: for each image pair the SVF ``v`` is optimised so that the moving image,
pulled back by ``exp(v)``, matches the fixed image (``moving o exp(v) ~ fixed``, the contract of
:mod:`inbrainsyn.fields`).

Algorithm (log-domain diffeomorphic demons with an LNCC or MSE force, Vercauteren et al. 2008;
force and step rule as in ANTs SyN, Avants et al. 2008)
-----------------------------------------------------------------------------------------
At each pyramid level (image shrunk by ``f``; the SVF lives on a *control grid* ``s`` times coarser
than that level's image), repeat:

1. ``d = exp(v)`` by scaling and squaring on the control grid, upsampled trilinearly to the level.
2. ``W = moving o (id + d)``; similarity map and its pointwise derivative ``dS/dW`` (ANTs' local
   approximation for LNCC, ``2 (I - W)`` for MSE).
3. Force ``f(x) = mask(x) dS/dW(x) grad W(x)``: the steepest-ascent direction of ``S`` for an update
   composed on the right, ``W o (id + u) ~ W + grad W . u``.
4. Update ``u = G_fluid * downsample(f)``, rescaled so that its largest vector is ``step`` control
   voxels (the step decays linearly to ``final_step_fraction * step`` within a level).
5. ``v <- G_diffusion * (v + u)``: first-order BCH for ``log(exp(v) o exp(u))`` (``bch_order=2``
   adds ``1/2 [v, u]``), then Gaussian smoothing of ``v`` (the diffusion-like regulariser).

Because the transform is ``exp`` of a smooth field it is a diffeomorphism by construction (up to
discretisation, measured by ``folding_fraction``).  All resampling is separable (see
:mod:`inbrainsyn.registration.pyramid`); the work is restricted to the mask's (or the foreground's)
bounding box plus a margin, and the result is extended to the whole fixed grid by border
replication of the velocity.

Output displacement: ``exp(v)`` evaluated on the control grid of the finest level and upsampled
trilinearly, i.e. ``exp`` is taken of the velocity at the resolution it was optimised at (a full
1 mm scaling and squaring would cost more than the whole registration on a CPU).  It differs from
``fields.exp(velocity)`` at full resolution by a small fraction of a voxel
(``Testing/test_registration.py`` bounds it).

Determinism: the algorithm has no random component; on CPU results are bit-identical between runs
with the same thread count.  On CUDA ``grid_sample``'s forward pass and matmul are deterministic
for a fixed GPU and library version (no atomics are used: no backward pass is taken).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from inbrainsyn import fields
from inbrainsyn.registration import pyramid
from inbrainsyn.registration.similarity import (
    SIMILARITIES,
    local_statistics,
    lncc_value_map,
    lncc_with_derivative,
    lncc_with_derivatives,
    mse_with_derivative,
    weighted_mean,
)


# Pyramid levels with fewer voxels than this run single-threaded (see _register).
SMALL_LEVEL_VOXELS = 1_000_000


@dataclass
class SVFRegistrationConfig:
    """Parameters of :func:`register_svf` (defaults tuned on the MNI152 brain, 1-2 mm).

    Lengths are in voxels of the grid named; ``levels``, ``iterations`` and ``control_factors``
    are matched tuples from the coarsest to the finest level.
    """

    similarity: str = "lncc"  # "lncc" (same modality, robust to intensity changes) or "mse"
    window: int = 5  # LNCC window (voxels of each level)
    levels: tuple[int, ...] = (4, 2, 1)  # image shrink factor of each level
    # largest number of iterations per level; the coarsest (4x) level is capped at 60: on the demo
    # subject (1 mm with skull) 200 coarse iterations never plateaued and folded 0.005 % of voxels,
    # 60 gave a higher final similarity (0.571 vs 0.562) with no folding, in less time
    iterations: tuple[int, ...] = (60, 200, 20)
    control_factors: tuple[int, ...] = (1, 2, 2)  # control grid = level grid shrunk by this
    # ... raised so that the control spacing is at least this (mm, finest axis; 0: off): the
    # field's freedom then follows the anatomy, not the scanner.  1.5 mm (the bank's grid) and 2 mm
    # images keep their 3 / 4 mm control grids; 1 mm images get 3 mm instead of 2 mm
    # (docs/registration.md: the 1 mm battery)
    min_control_spacing_mm: float = 3.0
    step: float = 0.5  # largest update per iteration, control voxels
    final_step_fraction: float = 0.3  # the step is halved on each plateau down to step * this
    fluid_sigma: float = 1.0  # Gaussian smoothing of each update, control voxels
    diffusion_sigma: float = 0.35  # Gaussian smoothing of v after each update, control voxels
    # ... but never less than this many mm (0: off): keeps the field prior of the bank's 1.5 mm grid
    # (0.35 x 3 mm control voxels = 1.05 mm) on finer grids, where 0.35 control voxels is less smooth
    diffusion_min_mm: float = 0.0
    fluid_min_mm: float = 0.0  # the same floor for the update smoothing (fluid_sigma)
    bch_order: int = 1  # 1: v + u; 2: v + u + 1/2 [v, u]
    symmetric: bool = False  # forces from both images in the middle space (exp(v/2), exp(-v/2))
    convergence_window: int = 10  # plateau test over this many iterations (0: run every iteration)
    convergence_tolerance: float = 1e-4  # plateau: similarity gain per iteration below this (relative)
    crop_margin_mm: float = 12.0  # margin around the mask / foreground bounding box
    min_level_spacing_mm: float = 0.0  # skip levels finer than this (e.g. 2.0: stop at 2 mm, faster)
    num_threads: int | None = None  # torch CPU threads (None: leave torch's setting)
    # never fold: when the result has any voxel with det <= 0, register again with diffusion_sigma
    # (and diffusion_min_mm) multiplied by fold_smoothing_factor, at most fold_retries times (the result records how many)
    fold_retries: int = 2
    fold_smoothing_factor: float = 1.5

    def validate(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if not (len(self.levels) == len(self.iterations) == len(self.control_factors)) or not self.levels:
            raise ValueError("levels, iterations and control_factors must be non-empty tuples of equal length")
        if any(int(f) < 1 for f in (*self.levels, *self.control_factors)) or any(int(n) < 0 for n in self.iterations):
            raise ValueError("levels and control_factors must be >= 1 and iterations >= 0")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number of voxels, got {self.window}")
        if self.bch_order not in (1, 2):
            raise ValueError("bch_order must be 1 or 2")
        if self.min_control_spacing_mm < 0:
            raise ValueError("min_control_spacing_mm must be >= 0 (0: off)")
        if self.diffusion_min_mm < 0 or self.fluid_min_mm < 0:
            raise ValueError("diffusion_min_mm and fluid_min_mm must be >= 0 (0: no floor)")
        if int(self.fold_retries) < 0 or self.fold_smoothing_factor <= 1.0:
            raise ValueError("fold_retries must be >= 0 and fold_smoothing_factor > 1")


@dataclass
class SVFRegistrationResult:
    """Outcome of :func:`register_svf`; fields on the fixed grid, voxel units, ``(3, Z, Y, X)``."""

    velocity: torch.Tensor
    displacement: torch.Tensor
    warped: torch.Tensor  # moving o (id + displacement), (Z, Y, X), moving's intensities
    similarity: float  # final similarity in the mask: mean squared LNCC (higher better) or MSE
    initial_similarity: float  # the same before registration
    similarity_name: str
    folding_fraction: float  # fraction of voxels (in the registered box) with det(D phi) <= 0
    min_jacobian: float
    seconds: float
    device: str
    history: list = field(default_factory=list)  # one dict per iteration: level, iteration, similarity, step
    convergence: list = field(default_factory=list)  # one dict per level: iterations run, why it stopped
    config: dict = field(default_factory=dict)
    box: dict = field(default_factory=dict)  # the registered region: start (z, y, x), size
    timings_s: dict = field(default_factory=dict)  # wall seconds per phase
    fold_retries: int = 0  # registrations redone with more smoothing because the first folded
    grid: fields.Grid | None = None  # the fixed image's geometry (set by register_images)


# --------------------------------------------------------------------------------------------
# Preparation: intensity normalisation and the registered box
# --------------------------------------------------------------------------------------------


def _robust_range(image: torch.Tensor) -> tuple[float, float]:
    """(minimum, 99.5th percentile of the voxels above the minimum), from a subsample."""
    low = float(image.min())
    sample = image.reshape(-1)[:: max(1, image.numel() // 2_000_000)]
    above = sample[sample > low]
    high = float(torch.quantile(above.float(), 0.995)) if above.numel() else float(image.max())
    return low, max(high, low + 1e-6)


def normalise_intensity(image: torch.Tensor) -> torch.Tensor:
    """Map the minimum to 0 and the 99.5th percentile of the foreground to 1 (float32)."""
    low, high = _robust_range(image)
    return (image.float() - low) / (high - low)


def _bounding_box(region: torch.Tensor) -> list[tuple[int, int]]:
    """Inclusive index range of the non-zero voxels along each of the 3 dims."""
    ranges = []
    for dim in range(3):
        other = tuple(d for d in range(3) if d != dim)
        present = torch.nonzero(region.amax(dim=other) > 0)
        ranges.append((int(present.min()), int(present.max())))
    return ranges


def registration_box(region: torch.Tensor, spacing_zyx, margin_mm: float, multiple: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Box ``(start, size)`` around the non-zero voxels of ``region`` plus ``margin_mm``.

    ``size - 1`` is rounded up to a multiple of ``multiple`` so that all pyramid and control grids
    nest exactly; the box may extend beyond the image (border replication fills it).
    """
    start, size = [], []
    for (lo, hi), s, n in zip(_bounding_box(region), spacing_zyx, region.shape):
        margin = int(math.ceil(margin_mm / s))
        lo, hi = max(lo - margin, 0), min(hi + margin, n - 1)
        length = hi - lo
        padded = int(math.ceil(length / multiple)) * multiple
        extra = padded - length
        lo -= extra // 2
        start.append(lo)
        size.append(padded + 1)
    return tuple(start), tuple(size)


# --------------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------------


def _anisotropic_sigmas(sigma: float, spacing_zyx) -> list[float]:
    """A smoothing of ``sigma`` voxels along the finest axis, the same in mm along the others."""
    finest = min(spacing_zyx)
    return [sigma * finest / s for s in spacing_zyx]


def control_factors_for(config: SVFRegistrationConfig, spacing_zyx) -> tuple[int, ...]:
    """``config.control_factors``, each raised to the smallest integer for which the control spacing
    (level spacing x factor, finest axis) reaches ``config.min_control_spacing_mm``."""
    finest = min(float(s) for s in spacing_zyx)
    factors = []
    for level, control in zip(config.levels, config.control_factors):
        needed = int(math.ceil(config.min_control_spacing_mm / (finest * level) - 1e-6)) if config.min_control_spacing_mm > 0 else 1
        factors.append(max(int(control), needed))
    return tuple(factors)


def _floored_sigma(sigma: float, min_mm: float, spacing_zyx) -> float:
    """``sigma`` control voxels, raised to ``min_mm`` when it is shorter than that along the finest axis.

    Grids whose smoothing already reaches ``min_mm`` (within 1e-6 mm) keep ``sigma`` exactly.
    """
    finest = min(spacing_zyx)
    if min_mm > 0 and sigma * finest < min_mm - 1e-6:
        return min_mm / finest
    return sigma


class GridSampler:
    """:func:`fields.sample_at` / :func:`fields.exp` on one grid with the identity grid cached.

    The optimisation warps the same grid hundreds of times; rebuilding the identity coordinates
    each time (as the general-purpose :mod:`fields` functions do) costs as much as the sampling
    itself.  Same maths, same border rule: ``Testing/test_registration.py`` checks equality with
    :mod:`fields`.
    """

    def __init__(self, shape, device, offset_zyx=(0, 0, 0), source_shape=None):
        """Points: the voxels of ``shape`` shifted by ``offset_zyx``, in a source grid ``source_shape`` (default ``shape``)."""
        nz, ny, nx = shape if source_shape is None else source_shape
        self.scale = torch.tensor(
            [2.0 / max(nx - 1, 1), 2.0 / max(ny - 1, 1), 2.0 / max(nz - 1, 1)], device=device
        ).view(1, 1, 1, 3)
        points = fields.voxel_coordinates(shape, device)
        if any(offset_zyx):
            points += torch.tensor([float(o) for o in reversed(list(offset_zyx))], device=device).view(3, 1, 1, 1)
        self.identity = (points.permute(1, 2, 3, 0) * self.scale - 1.0).unsqueeze(0)

    def sample(self, values: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        """``values`` ``(C, Z, Y, X)`` (on the source grid) or ``(Z, Y, X)`` at ``x + displacement(x)`` (trilinear)."""
        squeeze = values.dim() == 3
        vals = values.unsqueeze(0) if squeeze else values
        grid = torch.addcmul(self.identity, displacement.permute(1, 2, 3, 0).unsqueeze(0), self.scale)
        out = fields.grid_sample_3d(vals.unsqueeze(0), grid)[0]
        return out[0] if squeeze else out

    def exp(self, velocity: torch.Tensor) -> torch.Tensor:
        """Scaling and squaring exactly as :func:`fields.exp` (same number of steps)."""
        steps = fields.squaring_steps(velocity)
        disp = velocity / (2.0**steps)
        for _ in range(steps):
            disp = disp + self.sample(disp, disp)
        return disp


def image_gradient(image: torch.Tensor) -> torch.Tensor:
    """``(Z, Y, X)`` -> ``(3, Z, Y, X)`` gradient (components x, y, z), as :func:`fields.spatial_gradient`.

    Central differences inside, one-sided at the borders; written into one preallocated tensor.
    """
    out = torch.empty((3, *image.shape), dtype=image.dtype, device=image.device)
    for component, dim in enumerate((2, 1, 0)):
        n = image.shape[dim]
        target = out[component]
        if n < 2:
            target.zero_()
            continue
        if n > 2:
            inner = target.narrow(dim, 1, n - 2)
            torch.sub(image.narrow(dim, 2, n - 2), image.narrow(dim, 0, n - 2), out=inner)
            inner.mul_(0.5)
        torch.sub(image.narrow(dim, 1, 1), image.narrow(dim, 0, 1), out=target.narrow(dim, 0, 1))
        torch.sub(image.narrow(dim, n - 1, 1), image.narrow(dim, n - 2, 1), out=target.narrow(dim, n - 1, 1))
    return out


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """``det(I + D d)`` ``(Z, Y, X)``, equal to :func:`fields.jacobian_determinant` at half the memory."""
    rows = [image_gradient(displacement[i]) for i in range(3)]
    for i in range(3):
        rows[i][i].add_(1.0)
    (a, b, c), (d, e, f), (g, h, k) = rows
    return a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g)


class _Level:
    """Matrices and images of one pyramid level (see the module docstring)."""

    def __init__(self, fixed, moving, mask, box, factor, control, spacing_zyx, config, device, crop_to_weight: bool = True):
        start, size = box
        self.factor, self.control = factor, control
        self.shape = tuple((n - 1) // factor + 1 for n in size)
        self.control_shape = tuple((n - 1) // (factor * control) + 1 for n in size)
        stacked = torch.stack([fixed, moving] + ([mask] if mask is not None else []))
        if factor == 1:  # a plain crop (indices clamped: border replication outside the image)
            images = stacked
            for dim, (st, n, full) in enumerate(zip(start, self.shape, fixed.shape)):
                index = (st + torch.arange(n, device=device)).clamp(0, full - 1)
                images = images.index_select(dim + 1, index)
        else:  # anti-aliasing blur and decimation in one separable pass
            to_level = [
                pyramid.gaussian_matrix(st + factor * torch.arange(n), full, 0.5 * factor)
                for st, n, full in zip(start, self.shape, fixed.shape)
            ]
            images = pyramid.apply_separable(stacked, to_level)
        if mask is not None:  # LNCC windows touching the mask count
            weight = (pyramid.box_mean(images[2:3], config.window)[0] > 0.01).to(images.dtype)
        else:
            weight = None
        # The similarity and its force are computed only on the "inner" box: the weighted voxels
        # plus a margin of one LNCC window, inside which every window and central difference of a
        # weighted voxel lies, so the force is exactly the whole box's (zero outside the weight;
        # ``Testing/test_registration.py`` checks it).  The moving image stays whole: warped
        # points may come from anywhere in the box.  (15 % fewer voxels for the MNI brain at 1 mm.)
        # (Not in symmetric mode, where the fixed image and the weight are warped too.)
        if weight is not None and not config.symmetric and crop_to_weight and bool(weight.any()):
            margin = config.window
            self.inner = [(max(lo - margin, 0), min(hi + margin, n - 1) + 1)
                          for (lo, hi), n in zip(_bounding_box(weight), self.shape)]
        else:
            self.inner = [(0, n) for n in self.shape]
        crop = tuple(slice(lo, hi) for lo, hi in self.inner)
        self.inner_shape = tuple(hi - lo for lo, hi in self.inner)
        self.fixed = images[0][crop].contiguous()
        self.moving = images[1]  # the whole level box
        self.moving_inner = self.moving[crop]
        self.weight = None if weight is None else weight[crop].contiguous()
        # the fixed image's local LNCC statistics do not change during the level: computed once
        self.fixed_stats = local_statistics(self.fixed, config.window) if config.similarity == "lncc" else None
        control_spacing = [s * factor * control for s in spacing_zyx]
        fluid = _anisotropic_sigmas(_floored_sigma(config.fluid_sigma, config.fluid_min_mm, control_spacing), control_spacing)
        diffusion = _anisotropic_sigmas(_floored_sigma(config.diffusion_sigma, config.diffusion_min_mm, control_spacing),
                                        control_spacing)
        # the control grid nests in the level grid (the registration box is a multiple of every
        # level's control spacing): the control cells covering the inner box are upsampled by
        # 8-tap interpolation, then cropped (``displacement``)
        if any(n - 1 != control * (nc - 1) for n, nc in zip(self.shape, self.control_shape)):
            raise ValueError(f"control grid {self.control_shape} does not nest in the level grid {self.shape} "
                             f"(control factor {control}): make the box with registration_box")
        self.control_cover = []
        for (lo, hi), nc in zip(self.inner, self.control_shape):
            c_lo = min(lo // control, nc - 2)
            c_hi = max(min(-(-(hi - 1) // control), nc - 1), c_lo + 1)
            self.control_cover.append((c_lo, c_hi + 1, lo - c_lo * control))
        # force on the inner box -> control grid; the force is zero at the inner box's border
        # (or the border is the box's own), so the clamped (replicated) columns add nothing new
        self.down = [
            pyramid.gaussian_matrix(torch.arange(nc), nc, sf)
            @ pyramid.gaussian_matrix(control * torch.arange(nc) - lo, hi - lo, 0.5 * control if control > 1 else 0.0)
            for (lo, hi), nc, sf in zip(self.inner, self.control_shape, fluid)
        ]
        self.smooth = [pyramid.gaussian_matrix(torch.arange(nc), nc, sd) for nc, sd in zip(self.control_shape, diffusion)]
        self.down = [m.to(device) for m in self.down]
        self.smooth = [m.to(device) for m in self.smooth]
        self.image_sampler = GridSampler(self.inner_shape, device, offset_zyx=[lo for lo, _ in self.inner], source_shape=self.shape)
        self.control_sampler = GridSampler(self.control_shape, device)

    def _stats(self, window: int):
        return self.fixed_stats if self.fixed_stats is not None and self.fixed_stats.window == window else None

    def displacement(self, velocity: torch.Tensor) -> torch.Tensor:
        """``exp(v)`` on the control grid, upsampled to the inner box of the level grid (level voxel units)."""
        d = self.control_sampler.exp(velocity)
        if self.control == 1:
            return d[(slice(None), *(slice(lo, hi) for lo, hi in self.inner))]
        cover = d[(slice(None), *(slice(c_lo, c_hi) for c_lo, c_hi, _ in self.control_cover))]
        shape = tuple((c_hi - c_lo - 1) * self.control + 1 for c_lo, c_hi, _ in self.control_cover)
        fine = pyramid.nested_upsample(cover, shape)
        fine = fine[(slice(None), *(slice(off, off + n) for (_, _, off), n in zip(self.control_cover, self.inner_shape)))]
        return fine.mul(self.control)

    def evaluate(self, velocity: torch.Tensor | None, similarity: str, window: int):
        """Similarity (mask mean) and force ``(3, ...)`` on the level grid for the SVF ``velocity``.

        ``velocity=None`` scores the unregistered pair (identity transform).
        """
        warped = self.moving_inner if velocity is None else self.image_sampler.sample(self.moving, self.displacement(velocity))
        if similarity == "lncc":
            value_map, derivative = lncc_with_derivative(self.fixed, warped, window, self._stats(window))
            value = weighted_mean(value_map, self.weight)
        else:
            value_map, derivative = mse_with_derivative(self.fixed, warped)
            value = -weighted_mean(value_map, self.weight)  # maximised
        if self.weight is not None:
            derivative.mul_(self.weight)
        force = image_gradient(warped).mul_(derivative.unsqueeze(0))
        return float(value), force

    def evaluate_symmetric(self, velocity: torch.Tensor, similarity: str, window: int):
        """Similarity and force in the middle space: ``moving o exp(v/2)`` against ``fixed o exp(-v/2)``.

        The force is the moving side's minus the fixed side's (each ``dS/dW grad W``): a step ``u``
        of ``v`` moves each half by ``u/2`` in opposite directions, so both images pull alike and
        swapping them negates ``v`` (inverse consistency by construction: ``exp(-v)`` is the inverse).
        """
        half = self.displacement(0.5 * velocity)
        back = self.displacement(-0.5 * velocity)
        warped_m = self.image_sampler.sample(self.moving, half)
        warped_f = self.image_sampler.sample(self.fixed, back)
        weight = None if self.weight is None else self.image_sampler.sample(self.weight, back)
        if similarity == "lncc":
            value_map, d_m, d_f = lncc_with_derivatives(warped_f, warped_m, window)
            value = weighted_mean(value_map, weight)
        else:
            value_map, d_m = mse_with_derivative(warped_f, warped_m)
            d_f = -d_m
            value = -weighted_mean(value_map, weight)
        if weight is not None:
            d_m.mul_(weight)
            d_f.mul_(weight)
        force = image_gradient(warped_m).mul_(d_m.unsqueeze(0))
        force.sub_(image_gradient(warped_f).mul_(d_f.unsqueeze(0)))
        return float(value), force

    def score(self, velocity: torch.Tensor | None, similarity: str, window: int) -> float:
        """Similarity only (no force): for the reported initial and final values."""
        warped = self.moving_inner if velocity is None else self.image_sampler.sample(self.moving, self.displacement(velocity))
        if similarity == "lncc":
            return float(weighted_mean(lncc_value_map(self.fixed, warped, window, self._stats(window)), self.weight))
        return -float(weighted_mean((self.fixed - warped) ** 2, self.weight))

    def update(self, force: torch.Tensor, step: float) -> torch.Tensor:
        """Smoothed, downsampled force rescaled so its largest vector is ``step`` control voxels."""
        u = pyramid.apply_separable(force, self.down) / self.control
        largest = float(torch.sqrt((u * u).sum(0)).max())
        return u * (step / largest) if largest > 0 else u

    def regularise(self, velocity: torch.Tensor) -> torch.Tensor:
        return pyramid.apply_separable(velocity, self.smooth)


def _plateau_halvings(final_step_fraction: float) -> int:
    """Number of step halvings before a plateau ends a level (step * 2^-n >= final fraction)."""
    if final_step_fraction >= 1.0:
        return 0
    return max(0, int(math.floor(math.log2(1.0 / final_step_fraction) + 1e-9)))


def _rescale_velocity(velocity: torch.Tensor, old: _Level, new: _Level) -> torch.Tensor:
    """Carry the SVF from one level's control grid to the next (voxel units rescaled)."""
    ratio = (old.factor * old.control) / (new.factor * new.control)
    matrices = [
        pyramid.linear_matrix(torch.arange(n) / ratio, n_old).to(velocity.device)
        for n, n_old in zip(new.control_shape, old.control_shape)
    ]
    return pyramid.apply_separable(velocity, matrices) * ratio


def _to_full_grid(field_on_control: torch.Tensor, level: _Level, box, full_shape) -> torch.Tensor:
    """Control-grid field -> the whole fixed grid (full voxel units), border-replicated outside the box."""
    start, _ = box
    spacing = level.factor * level.control
    matrices = [
        pyramid.linear_matrix((torch.arange(n) - st) / spacing, nc).to(field_on_control.device)
        for n, st, nc in zip(full_shape, start, level.control_shape)
    ]
    return pyramid.apply_separable(field_on_control, matrices) * spacing


def _check_inputs(fixed: torch.Tensor, moving: torch.Tensor, mask) -> None:
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.dim() != 3:
            raise ValueError(f"{name} image must be a (Z, Y, X) tensor, got shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError(f"{name} image contains NaN or infinite values")
        if float(image.max()) == float(image.min()):
            raise ValueError(f"{name} image is constant: nothing to register")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must share one grid")
    if mask is not None:
        if mask.shape != fixed.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must be on the fixed grid {tuple(fixed.shape)}")
        if not bool((mask > 0).any()):
            raise ValueError("mask is empty")


def register_svf(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    spacing=(1.0, 1.0, 1.0),
    mask: torch.Tensor | None = None,
    config: SVFRegistrationConfig | None = None,
    device=None,
    seed: int = 0,
    progress=None,
) -> SVFRegistrationResult:
    """Find the SVF ``v`` with ``moving o exp(v) ~ fixed`` (both ``(Z, Y, X)`` on one grid).

    spacing:  ``(sx, sy, sz)`` in mm (ITK order); used for the crop margin and to make smoothing
              isotropic in mm on anisotropic grids.
    mask:     optional ``(Z, Y, X)`` region of the fixed image (e.g. the brain) where similarity
              is measured; the work is restricted to its bounding box plus a margin.
    device:   ``None``/"cpu", "cuda", "auto" or a ``torch.device``.
    progress: optional ``callable(fraction, message)``.
    Returns an :class:`SVFRegistrationResult` (fields on the CPU).
    """
    started = time.perf_counter()
    config = config or SVFRegistrationConfig()
    config.validate()
    _check_inputs(fixed, moving, mask)
    if isinstance(device, str) or device is None:
        device = fields.resolve_device(device or "cpu")
    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    try:
        result = _register(fixed, moving, spacing, mask, config, device, seed, progress, started)
        retried = config
        for retry in range(int(config.fold_retries)):
            if result.folding_fraction == 0.0:
                break
            retried = replace(retried, diffusion_sigma=retried.diffusion_sigma * config.fold_smoothing_factor,
                              diffusion_min_mm=retried.diffusion_min_mm * config.fold_smoothing_factor)
            result = _register(fixed, moving, spacing, mask, retried, device, seed, progress, started)
            result.fold_retries = retry + 1
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _register(fixed, moving, spacing, mask, config, device, seed, progress, started) -> SVFRegistrationResult:
    torch.manual_seed(seed)
    spacing_zyx = (float(spacing[2]), float(spacing[1]), float(spacing[0]))

    with torch.no_grad():
        fixed_n = normalise_intensity(fixed.to(device))
        moving_n = normalise_intensity(moving.to(device))
        mask_d = (mask.to(device) > 0).float() if mask is not None else None
        region = mask_d if mask_d is not None else ((fixed_n > 0.05) | (moving_n > 0.05)).float()
        if not bool(region.any()):
            region = torch.ones_like(fixed_n)
        controls = control_factors_for(config, spacing_zyx)
        multiple = math.lcm(*(int(f) * c for f, c in zip(config.levels, controls)))  # every grid nests in the box
        box = registration_box(region, spacing_zyx, config.crop_margin_mm, multiple)

        plan = [(f, c, n) for f, c, n in zip(config.levels, controls, config.iterations)
                if min((size - 1) // (f * c) + 1 for size in box[1]) >= 4
                and f * max(spacing_zyx) >= config.min_level_spacing_mm - 1e-6]
        if not plan:
            raise ValueError(f"image region {box[1]} is too small for the pyramid levels {config.levels}")
        costs = [n * math.prod((size - 1) // f + 1 for size in box[1]) for f, _, n in plan]
        total_cost, done_cost = max(sum(costs), 1), 0.0

        history: list[dict] = []
        convergence: list[dict] = []
        timings = {"prepare": time.perf_counter() - started}
        velocity, previous = None, None
        threads = torch.get_num_threads()
        for index, (factor, control, n_iter) in enumerate(plan):
            level_started = time.perf_counter()
            # Small grids gain nothing from threads, and on a busy CPU each parallel region waits
            # for a descheduled thread (measured 10x slower at 4 mm): run them on one thread.
            small = math.prod((size - 1) // factor + 1 for size in box[1]) < SMALL_LEVEL_VOXELS
            torch.set_num_threads(1 if small else threads)
            level = _Level(fixed_n, moving_n, mask_d, box, factor, control, spacing_zyx, config, device)
            if velocity is None:
                velocity = torch.zeros((3, *level.control_shape), device=device)
            else:
                velocity = _rescale_velocity(velocity, previous, level)
            step = config.step
            halvings = _plateau_halvings(config.final_step_fraction)
            window = int(config.convergence_window)
            values: list[float] = []
            restart, stopped = 0, "max_iterations"
            for it in range(n_iter):
                if config.symmetric:
                    value, force = level.evaluate_symmetric(velocity, config.similarity, config.window)
                else:
                    value, force = level.evaluate(velocity, config.similarity, config.window)
                values.append(value)
                history.append({"level": index, "factor": factor, "iteration": it, "similarity": value, "step": step})
                if window > 0:
                    if it - restart >= window:
                        gain = (values[-1] - values[-1 - window]) / window
                        if gain < config.convergence_tolerance * max(abs(values[-1]), 1e-3):
                            if halvings == 0:
                                stopped = "converged"
                                break
                            step, halvings, restart = 0.5 * step, halvings - 1, it
                else:
                    step = config.step * (1.0 - (1.0 - config.final_step_fraction) * it / max(n_iter - 1, 1))
                update = level.update(force, step)
                if config.bch_order == 2:
                    velocity = fields.bch(velocity, update, order=2)
                else:
                    velocity = velocity + update
                velocity = level.regularise(velocity)
                done_cost += costs[index] / max(n_iter, 1)
                if progress is not None:
                    progress(min(done_cost / total_cost, 1.0) * 0.95, f"level {index + 1}/{len(plan)} (1/{factor} resolution), iteration {it + 1}/{n_iter}")
            done_cost = sum(costs[: index + 1])
            convergence.append({"level": index, "factor": factor, "control": control, "iterations": len(values),
                                "max_iterations": n_iter, "stopped": stopped,
                                "similarity_first": values[0] if values else None,
                                "similarity_last": values[-1] if values else None})
            previous = level
            timings[f"level{index + 1}_1/{factor}"] = time.perf_counter() - level_started

        torch.set_num_threads(threads)
        outputs_started = time.perf_counter()
        final_value = level.score(velocity, config.similarity, config.window)
        initial = level.score(None, config.similarity, config.window)
        full_velocity = _to_full_grid(velocity, level, box, fixed.shape)
        displacement = _to_full_grid(fields.exp(velocity), level, box, fixed.shape)
        warped = fields.warp(moving.to(device).float(), displacement)
        inside = tuple(slice(max(st, 0), min(st + n, full)) for st, n, full in zip(box[0], box[1], fixed.shape))
        det = jacobian_determinant(displacement[(slice(None), *inside)])
        folding = float((det <= 0).float().mean())
        min_jac = float(det.min())
        timings["outputs"] = time.perf_counter() - outputs_started

    if progress is not None:
        progress(1.0, "registration done")
    name = config.similarity
    return SVFRegistrationResult(
        velocity=full_velocity.cpu(),
        displacement=displacement.cpu(),
        warped=warped.cpu(),
        similarity=final_value if name == "lncc" else -final_value,
        initial_similarity=initial if name == "lncc" else -initial,
        similarity_name="mean squared LNCC in mask (higher is better)" if name == "lncc" else "MSE of normalised intensities in mask (lower is better)",
        folding_fraction=folding,
        min_jacobian=min_jac,
        seconds=time.perf_counter() - started,
        device=str(device),
        history=history,
        convergence=convergence,
        config=asdict(config),
        box={"start_zyx": list(box[0]), "size_zyx": list(box[1])},
        timings_s=timings,
    )
