"""Synthetic fields for tests (a plain module: test files import it by name, conftest files cannot be)."""

from __future__ import annotations

import numpy as np
import torch


def smooth_random_field(shape, max_norm_vox, seed=0, sigma=None):
    """Smooth random ``(3, Z, Y, X)`` field (voxel units) scaled so its largest vector is ``max_norm_vox``."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
    sigma = sigma or max(shape) / 6.0
    from scipy.ndimage import gaussian_filter

    smooth = np.stack([gaussian_filter(c.numpy(), sigma, mode="nearest") for c in noise])
    field = torch.from_numpy(smooth)
    field = field / torch.sqrt((field**2).sum(0)).max() * max_norm_vox
    return field.float()
