"""DaniNet losses (METHODS.md section 4), on a subset of age bins per sample.

Notation: x (B, 1, S, S) a real slice in [-1, 1] with true age a and bin b(a); for each sample
a set of K generated bins j_1 < ... < j_K (the true bin, its neighbours and random others,
see ``train.choose_bins``) with g (B, K, 1, S, S) = G(E(x), j, d, k).

* L_def = mean_B sum_j w_j(a) mean_p |g_j - x|, w_j = Gaussian membership of a (sigma 2.5 y)
  plus a floor of 0.01 (as the code's profile weight functions).
* L_vox = 1/2 (mean_p |max_{j >= b(a)} g_j - x| + mean_p |min_{j < b(a)} g_j - x|):
  the brightest future output equals x and the darkest past one equals x, so voxels only
  darken forward in time (the second term is dropped when no past bin is in the subset).
* L_reg = min(MSE(r_gen, r_hat), 10) * area / 64 for one random usable region per sample and
  one random pair of the generated bins; r_gen the ratio of the region's intensity sums in the
  two generated images, r_hat the regressors' prediction for the two bin centres.
* Adversarial (sigmoid cross-entropy on logits): D_z tells E(x) from U(-1, 1); D_b tells real
  (x, labels of x) from (G(E(x), labels of x), same labels); E and G are trained to fool them.

Training on a random subset of K of the 10 bins (instead of all 10) is our CPU-budget deviation:
L_def's weight beyond +-1 bin is below 0.01, and L_vox/L_reg see all bins over many steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet.regressors import RegionRegressors

L_DEF_FLOOR = 0.01


def def_weights(age: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """w_j(a) for ages (B,) at chosen bins (B, K): membership + floor -> (B, K)."""
    m = torch.as_tensor(cond.age_membership(age.numpy()), dtype=torch.float32)  # (B, 10)
    return m.gather(1, bins) + L_DEF_FLOOR


def loss_def(g: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_def: g (B, K, 1, S, S), x (B, 1, S, S), weights (B, K) -> scalar."""
    err = (g - x[:, None]).abs().mean(dim=(2, 3, 4))  # (B, K)
    return (weights * err).sum(dim=1).mean()


def loss_vox(g: torch.Tensor, x: torch.Tensor, bins: torch.Tensor, true_bin: torch.Tensor) -> torch.Tensor:
    """L_vox: g (B, K, 1, S, S), x (B, 1, S, S), bins (B, K), true_bin (B,) -> scalar."""
    future = (bins >= true_bin[:, None])[:, :, None, None, None]
    past = ~future
    big = torch.finfo(g.dtype).max
    g_max_future = torch.where(future, g, torch.full_like(g, -big)).amax(dim=1)  # (B, 1, S, S)
    term_future = (g_max_future - x).abs().mean(dim=(1, 2, 3))
    has_past = past.flatten(1).any(dim=1)
    g_min_past = torch.where(past, g, torch.full_like(g, big)).amin(dim=1)
    term_past = torch.where(has_past, (torch.where(has_past[:, None, None, None], g_min_past, x) - x).abs().mean(dim=(1, 2, 3)),
                            torch.zeros_like(term_future))
    return 0.5 * (term_future.mean() + term_past.mean())


def loss_reg(g: torch.Tensor, bins: torch.Tensor, dx: torch.Tensor, slice_index: torch.Tensor,
             regressors: RegionRegressors, rng: np.random.Generator) -> torch.Tensor:
    """L_reg for one random bin pair and one random usable region per sample -> scalar."""
    b, k = bins.shape
    if k < 2:
        return g.new_zeros(())
    grid = regressors.grid
    s = g.shape[-1]
    cell = s // grid
    usable = regressors.usable_regions(slice_index.numpy())  # (B, regions)
    pair = np.sort(np.stack([rng.choice(k, 2, replace=False) for _ in range(b)]), axis=1)  # (B, 2)
    region = np.array([rng.choice(np.flatnonzero(u)) if u.any() else -1 for u in usable])
    keep = region >= 0
    if not keep.any():
        return g.new_zeros(())
    idx = np.flatnonzero(keep)
    bins_np = bins.numpy()
    centres = cond.AGE_CENTRES
    r_hat = regressors.predict_ratio(centres[bins_np[idx, pair[idx, 0]]], centres[bins_np[idx, pair[idx, 1]]],
                                     dx.numpy()[idx], slice_index.numpy()[idx])[np.arange(len(idx)), region[idx]]
    rows, cols = region[idx] // grid, region[idx] % grid
    sums = []
    for n, (i, r, c) in enumerate(zip(idx, rows, cols)):
        patch = g[i, :, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]  # (K, 1, cell, cell)
        sums.append(((patch + 1.0) * 0.5).sum(dim=(1, 2, 3)))
    sums = torch.stack(sums)  # (n, K)
    sel = torch.as_tensor(pair[idx])
    r_gen = sums.gather(1, sel[:, 1:2]).squeeze(1) / sums.gather(1, sel[:, 0:1]).squeeze(1).clamp_min(1e-3)
    mse = F.mse_loss(r_gen, torch.as_tensor(r_hat, dtype=r_gen.dtype))
    return mse.clamp(max=10.0) * (cell * cell) / 64.0


def bce_logits(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Sigmoid cross-entropy against an all-real or all-fake target."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
