"""Phantom subjects whose anatomy differs from the template, with known labels (for evaluation).

A subject is the bank template of a cohort at an age, whose ventricles, hippocampi and amygdalae are
first resized by prescribed factors with the atrophy solver (:func:`atrophy.solve_ageing_svf`: a
diffeomorphism realising regional log-volume changes, CSF taking up the difference inside a fixed
skull), then warped by a random inter-subject diffeomorphism ``psi = A o exp(r)`` (as in
:mod:`inbrainsyn.phantom`), optionally surrounded by a synthetic skull and scalp, and acquired with
a smooth multiplicative bias and Rician noise.  The partial-volume label maps are warped with the
image (trilinear), so the subject's true regional volumes and label maps are known.

Used by ``benchmarks/bench_subject_volumes.py`` and the tests of :mod:`inbrainsyn.anatomy`; never
built from Colin27.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.phantom import acquire, random_affine_displacement, resample_to_grid, smooth_noise, subject_grid, synthetic_skull
from inbrainsyn.templates import atrophy
from inbrainsyn.templates.regions import argmax_labels, one_hot, summary_volumes_from_maps


@dataclass
class VariedSubject:
    image: sitk.Image  # the acquired T1 (float32, scanner-like units)
    labels: sitk.Image  # true label map (argmax of the true partial volumes), uint8
    maps: torch.Tensor  # (R, Z, Y, X) true partial volumes of ``values`` on the image's grid
    values: list[int]
    volumes_ml: dict[str, float]  # true summary-region volumes
    achieved: dict[str, float]  # log-volume changes realised by the solver (before psi)
    plan: dict


def varied_subject(bank, age: float, ventricle_factor: float = 1.0, hippocampus_factor: float = 1.0,
                   amygdala_factor: float | None = None, seed: int = 0, cohort: str = "HC",
                   spacing: float | None = None, skull: bool = True, max_displacement_mm: float = 6.0,
                   noise: float = 0.02, bias_amplitude: float = 0.15, solve_spacing_mm: float = 3.0) -> VariedSubject:
    """One subject: the ``cohort`` template at ``age`` with ventricles x ``ventricle_factor``, hippocampi x
    ``hippocampus_factor`` and amygdalae x ``amygdala_factor`` (default: the hippocampal factor), on a
    grid of ``spacing`` mm (default: the bank's)."""
    rng = np.random.default_rng([seed, 77])
    grid = subject_grid(bank, spacing)
    spacing_zyx = tuple(reversed(grid.spacing))
    values = sorted(bank.label_names)
    names = [bank.label_names[v] for v in values]
    template = bank.template_tensor(cohort, age)
    labels = bank.labels_tensor(cohort, age)
    stack = resample_to_grid(torch.cat([template[None], one_hot(labels, values)]), bank.grid, grid)
    template, maps = stack[0], stack[1:].clamp(0, 1)
    shape = tuple(template.shape)

    factors = {"lateral_ventricles": ventricle_factor, "hippocampus": hippocampus_factor,
               "amygdala": hippocampus_factor if amygdala_factor is None else amygdala_factor}
    prescribed = {k: math.log(f) for k, f in factors.items() if abs(f - 1.0) > 1e-6 and k in names}
    disp = torch.zeros((3, *shape))
    achieved: dict[str, float] = {}
    if prescribed:
        solution = atrophy.solve_ageing_svf(maps, names, prescribed, spacing_zyx, solve_spacing_mm=solve_spacing_mm)
        disp = fields.exp(solution.velocity)
        achieved = solution.achieved
    r = torch.from_numpy(smooth_noise(shape, spacing_zyx, 15.0, rng, channels=3)).float()
    r = r * (max_displacement_mm / grid.spacing[0])
    psi = fields.compose(random_affine_displacement(shape, spacing_zyx, rng), fields.exp(r))
    total = fields.compose(disp, psi)  # template o exp(u) o psi
    clean = fields.warp(template, total).numpy()
    subject_maps = fields.warp(maps, total).clamp(0, 1)
    subject_labels = argmax_labels(subject_maps, values).numpy()
    if skull:
        clean = np.where(subject_labels > 0, clean, synthetic_skull(subject_labels > 0, grid.spacing[0]))
    scale, gamma = float(rng.uniform(800, 1200)), float(rng.uniform(0.9, 1.1))
    bias = np.exp(bias_amplitude * smooth_noise(shape, spacing_zyx, 80.0, rng)[0])
    observed = acquire(clean, scale, gamma, bias, noise, rng if noise > 0 else None)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    image = grid.apply_to(sitk.GetImageFromArray(observed.astype(np.float32)))
    label_image = sitk.Cast(grid.apply_to(sitk.GetImageFromArray(subject_labels.astype(np.uint8))), sitk.sitkUInt8)
    return VariedSubject(
        image=image, labels=label_image, maps=subject_maps, values=values,
        volumes_ml=summary_volumes_from_maps(subject_maps, values, bank.label_names, voxel_ml),
        achieved=achieved,
        plan={"age": age, "cohort": cohort, "seed": seed, "factors": factors, "skull": skull,
              "max_displacement_mm": max_displacement_mm, "noise": noise, "bias_amplitude": bias_amplitude,
              "spacing": grid.spacing[0]},
    )
