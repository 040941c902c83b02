"""The labels DaniNet conditions on: age bin, diagnosis class, slice position.

Age bins. The public DaniNet code uses 10 bins bounded by the ADNI-derived ages
63, 65.5, 68, ..., 88 (METHODS.md section 4). Our template bank spans 55-95 years, so we
keep **10 bins** but redefine them as equal 4-year bins over [55, 95]::

    edges   = 55, 59, 63, ..., 91, 95        centres = 57, 61, ..., 93

Ages outside [55, 95] fall into the end bins.

Continuous age. A continuous age t is a soft membership over the bins,
``m_b(t) = exp(-(t - c_b)^2 / (2 sigma^2)) / sum_b' (...)`` with sigma = 2.5 y as in the code's
3D assembly; this blends the generator's per-bin outputs (preview) and weights L_def.

Diagnosis. DaniNet's four classes are CN (0), SMC (1), MCI (2: EMCI, MCI, LMCI), AD (3).
Our cohorts map ``HC -> CN`` and ``AD -> AD``; MCI-type groups and converters
(``MCI``, ``pMCI``, ``converter``...) map to MCI. Case-insensitive.

Slice position. We train ONE model for a band of axial slices instead of one model per
slice (a documented deviation, to train on CPU): the slice index k is coded as a soft
membership over ``n_anchors`` evenly spaced anchor slices of the trained band
(Gaussian, sigma = anchor spacing), so neighbouring slices get neighbouring codes.
"""

from __future__ import annotations

import numpy as np
import torch

from inbrainsyn.errors import InputError

N_AGE_BINS = 10
AGE_MIN = 55.0
AGE_MAX = 95.0
AGE_EDGES = np.linspace(AGE_MIN, AGE_MAX, N_AGE_BINS + 1)
AGE_CENTRES = 0.5 * (AGE_EDGES[:-1] + AGE_EDGES[1:])
AGE_SIGMA_Y = 2.5

DIAGNOSIS_CLASSES = ("CN", "SMC", "MCI", "AD")
_DIAGNOSIS_ALIASES = {
    "hc": 0, "cn": 0, "nc": 0, "healthy": 0, "control": 0,
    "smc": 1,
    "mci": 2, "emci": 2, "lmci": 2, "pmci": 2, "smci": 2, "converter": 2, "conv": 2,
    "hc2ad": 2, "mci2ad": 2,
    "ad": 3, "dementia": 3,
}


def age_bin(age: float) -> int:
    """Index b of the 4-year bin holding ``age`` (clamped to the end bins)."""
    if not np.isfinite(age):
        raise InputError(f"age must be a finite number of years, got {age!r}")
    return int(np.clip(np.searchsorted(AGE_EDGES, age, side="right") - 1, 0, N_AGE_BINS - 1))


def age_membership(age: float | np.ndarray, sigma: float = AGE_SIGMA_Y) -> np.ndarray:
    """Soft membership m_b(t) of age(s) t over the bin centres, rows summing to 1.

    Shape: () -> (10,), (N,) -> (N, 10).
    """
    t = np.asarray(age, dtype=np.float64)
    logits = -((t[..., None] - AGE_CENTRES) ** 2) / (2.0 * sigma**2)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def diagnosis_class(group: str) -> int:
    """DaniNet class index (0 CN, 1 SMC, 2 MCI, 3 AD) of a cohort group name (HC, AD, ...)."""
    key = str(group).strip().lower().replace("-", "").replace("_", "").replace(">", "2")
    if key not in _DIAGNOSIS_ALIASES:
        raise InputError(
            f"unknown cohort/diagnosis {group!r}: use HC (healthy, mapped to CN), AD, MCI or SMC"
        )
    return _DIAGNOSIS_ALIASES[key]


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) long -> (B, n) float one-hot."""
    return torch.nn.functional.one_hot(index.long(), n).float()


def slice_code(slice_index: torch.Tensor, band: tuple[int, int], n_anchors: int) -> torch.Tensor:
    """Soft membership (B, n_anchors) of slice indices (B,) over anchors spanning ``band``.

    anchors a_i = lo + i (hi - lo)/(n-1); code_i = exp(-(k - a_i)^2 / (2 s^2)) normalised, s = spacing.
    """
    lo, hi = band
    anchors = torch.linspace(float(lo), float(hi), n_anchors)
    spacing = max((hi - lo) / max(n_anchors - 1, 1), 1.0)
    k = slice_index.float()[:, None]
    w = torch.exp(-((k - anchors[None, :]) ** 2) / (2.0 * spacing**2))
    return w / w.sum(dim=1, keepdim=True)
