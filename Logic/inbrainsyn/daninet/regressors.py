"""Per-region intensity-progression regressors: the targets of L_reg.

DaniNet fits, per slice and per region, a regressor (linear SVR in the MICCAI paper) that
predicts how the summed intensity of a region changes between two ages from
(age_1, age_2, diagnosis). We fit it by ridge-regularised least squares (closed form; a linear
model like the paper's linear-kernel SVR, without an extra dependency) on every pair of scans
(i earlier than j) of the same training subject::

    r_ij = sum_{p in R} x_j(p) / sum_{p in R} x_i(p)            (x in [0, 1])
    r_ij - 1 ~ beta . f(a_i, a_j, d),   f = D * [1, (a_i - 75)/10, [d = MCI], [d = AD]],  D = (a_j - a_i)/10

f vanishes at D = 0, so equal ages predict no change. Regions R are the cells of a
``grid x grid`` partition of the 128x128 frame (16 cells of 32x32 pixels by default);
cells with little brain (mean intensity of the training slices < ``min_content``) are not used.
Regressors are kept per trained slice index; other slices of the band use the nearest one.
"""

from __future__ import annotations

import numpy as np
import torch

N_FEATURES = 4


def features(age_from: np.ndarray, age_to: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """f(a_i, a_j, d): (N,), (N,), (N,) -> (N, 4)."""
    a1, a2, d = (np.asarray(v, dtype=np.float64) for v in (age_from, age_to, dx))
    delta = (a2 - a1) / 10.0
    return np.stack([delta, delta * (a1 - 75.0) / 10.0, delta * (d == 2), delta * (d == 3)], axis=1)


def region_sums(frames: torch.Tensor, grid: int) -> torch.Tensor:
    """Sum of [0, 1] intensity per grid cell: (N, 1, S, S) in [-1, 1] -> (N, grid*grid)."""
    x01 = (frames + 1.0) * 0.5
    n, _, s, _ = x01.shape
    cell = s // grid
    return x01.view(n, grid, cell, grid, cell).sum(dim=(2, 4)).reshape(n, grid * grid)


class RegionRegressors:
    """Linear ratio regressors beta[slice, region] (n_slices, n_regions, 4) plus a usable-region mask."""

    def __init__(self, slice_indices: np.ndarray, coef: np.ndarray, usable: np.ndarray, grid: int):
        self.slice_indices = np.asarray(slice_indices, dtype=np.int64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.usable = np.asarray(usable, dtype=bool)
        self.grid = int(grid)

    @classmethod
    def fit(cls, frames: torch.Tensor, subject: np.ndarray, age: np.ndarray, dx: np.ndarray,
            slice_index: np.ndarray, grid: int = 4, ridge: float = 1e-3, min_content: float = 0.05) -> "RegionRegressors":
        """Fit on training frames (N, 1, S, S) with per-frame subject id, age, class, slice index (N,)."""
        sums = region_sums(frames, grid).numpy().astype(np.float64)
        area = (frames.shape[-1] // grid) ** 2
        slices = np.unique(slice_index)
        coef = np.zeros((len(slices), grid * grid, N_FEATURES))
        usable = np.zeros((len(slices), grid * grid), dtype=bool)
        for si, k in enumerate(slices):
            rows = np.flatnonzero(slice_index == k)
            usable[si] = sums[rows].mean(axis=0) / area >= min_content
            pi, pj = [], []
            for subj in np.unique(subject[rows]):
                r = rows[subject[rows] == subj]
                r = r[np.argsort(age[r])]
                for a in range(len(r)):
                    for b in range(a + 1, len(r)):
                        if age[r[b]] > age[r[a]]:
                            pi.append(r[a]); pj.append(r[b])
            if not pi:
                continue
            pi, pj = np.array(pi), np.array(pj)
            f = features(age[pi], age[pj], dx[pi])
            ratio = sums[pj] / np.maximum(sums[pi], 1e-6) - 1.0  # (P, regions)
            gram = f.T @ f + ridge * len(f) * np.eye(N_FEATURES)
            coef[si] = np.linalg.solve(gram, f.T @ ratio).T
        return cls(slices, coef, usable, grid)

    def _slice_rows(self, slice_index: np.ndarray) -> np.ndarray:
        k = np.asarray(slice_index)[:, None]
        return np.abs(k - self.slice_indices[None, :]).argmin(axis=1)

    def predict_ratio(self, age_from, age_to, dx, slice_index) -> np.ndarray:
        """Predicted ratio r (N, regions) of regional intensity sums at age_to over age_from."""
        rows = self._slice_rows(slice_index)
        f = features(age_from, age_to, dx)
        return 1.0 + np.einsum("nrf,nf->nr", self.coef[rows], f)

    def usable_regions(self, slice_index) -> np.ndarray:
        """(N, regions) bool: regions with enough brain to be used for L_reg."""
        return self.usable[self._slice_rows(slice_index)]

    def to_state(self) -> dict:
        return {"slice_indices": torch.as_tensor(self.slice_indices), "coef": torch.as_tensor(self.coef),
                "usable": torch.as_tensor(self.usable), "grid": self.grid}

    @classmethod
    def from_state(cls, state: dict) -> "RegionRegressors":
        return cls(state["slice_indices"].numpy(), state["coef"].numpy(), state["usable"].numpy(), int(state["grid"]))
