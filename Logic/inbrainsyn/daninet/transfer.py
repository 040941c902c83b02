"""Test-time transfer learning (the paper's T): fine-tune on the subject's baseline slices.

DaniNet's code fine-tunes the trained model on the test subjects' baseline slices only
(1,500 epochs) with loss weights (35, 5e-4, 3e-3, 1.5, 1.5) for (L_def, L_G, L_Ez, L_vox, L_reg),
then queries it at every age bin. We do the same on a *copy* of the model, for a user-chosen
number of steps (a quick preview uses 0-50), on the given slice(s) of one subject.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from inbrainsyn.daninet.model import DaniNet
from inbrainsyn.daninet.regressors import RegionRegressors
from inbrainsyn.daninet.train import TrainConfig, make_optimisers, train_step

TRANSFER_WEIGHTS = (35.0, 5e-4, 3e-3, 1.5, 1.5)


def finetune(model: DaniNet, frames: torch.Tensor, age: float, dx: int, slice_index: np.ndarray,
             steps: int, lr: float = 1e-4, seed: int = 0) -> DaniNet:
    """A fine-tuned copy of ``model``: frames (N, 1, S, S) in [-1, 1] of one subject at ``age``.

    N >= 1 (a single frame is duplicated so that the discriminators' batch norm sees 2 samples).
    The input model is left untouched.
    """
    tuned = copy.deepcopy(model)
    if steps <= 0:
        return tuned.eval()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if frames.shape[0] == 1:
        frames, slice_index = frames.repeat(2, 1, 1, 1), np.repeat(slice_index, 2)
    n = frames.shape[0]
    batch = (frames, torch.full((n,), float(age)), torch.full((n,), int(dx), dtype=torch.long),
             torch.as_tensor(np.asarray(slice_index), dtype=torch.long))
    cfg = TrainConfig(lr=lr, weights=TRANSFER_WEIGHTS, seed=seed)
    opts = make_optimisers(tuned, cfg)
    regs = RegionRegressors.from_state(tuned.regressors) if tuned.regressors is not None else None
    for _ in range(int(steps)):
        train_step(tuned, opts, batch, cfg, regs, rng)
    return tuned.eval()
