"""Anatomical regions of the template banks: label names, one-hot maps and regional volumes.

A bank's label map uses integer labels whose names are given in ``bank.json``.  The canonical
names (those the atrophy model and the reports know) are :data:`CANONICAL_LABELS`; a user bank
may use other integers but must name its labels with these names so that regions can be found.

Summary regions reported everywhere (``volumes.csv``, evaluation), from the canonical labels:

* ``ventricles``  = lateral_ventricles
* ``hippocampus`` = hippocampus
* ``amygdala``    = amygdala
* ``gm``          = cortical_gm + subcortical_gm + hippocampus + amygdala + the cortical parcels
                    (:data:`CORTICAL_PARCEL_LABELS`, when a bank has them): all grey matter
* ``wm``          = cerebral_wm
* ``whole_brain`` = every tissue label, i.e. all labels except csf and lateral_ventricles
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

# The default bank's label values; user banks may number them differently (names are what count).
CANONICAL_LABELS: dict[int, str] = {
    1: "lateral_ventricles",
    2: "hippocampus",
    3: "amygdala",
    4: "cortical_gm",
    5: "subcortical_gm",
    6: "cerebral_wm",
    7: "csf",
}
REQUIRED_LABEL_NAMES = tuple(CANONICAL_LABELS.values())

# Optional cortical parcels of the regional atrophy model (the default bank labels them 8-15; they
# are cortical grey matter, so they count in ``gm``; ``cortical_gm`` is then the remaining cortex).
CORTICAL_PARCEL_LABELS: dict[int, str] = {
    8: "entorhinal_parahippocampal",
    9: "lateral_temporal",
    10: "posterior_cingulate_precuneus",
    11: "inferior_parietal",
    12: "frontal",
    13: "insula",
    14: "sensorimotor",
    15: "occipital",
}
DEFAULT_BANK_LABELS: dict[int, str] = {**CANONICAL_LABELS, **CORTICAL_PARCEL_LABELS}

# Labels that are fluid, not tissue.
FLUID_LABEL_NAMES = ("csf", "lateral_ventricles")

SUMMARY_REGIONS: dict[str, tuple[str, ...]] = {
    "ventricles": ("lateral_ventricles",),
    "hippocampus": ("hippocampus",),
    "amygdala": ("amygdala",),
    "gm": ("cortical_gm", "subcortical_gm", "hippocampus", "amygdala", *CORTICAL_PARCEL_LABELS.values()),
    "wm": ("cerebral_wm",),
    "whole_brain": ("cortical_gm", "subcortical_gm", "hippocampus", "amygdala", "cerebral_wm",
                    *CORTICAL_PARCEL_LABELS.values()),
}


def label_values_by_name(label_names: dict[int, str]) -> dict[str, int]:
    """Invert ``{value: name}``."""
    return {str(name): int(value) for value, name in label_names.items()}


def summary_label_values(label_names: dict[int, str]) -> dict[str, list[int]]:
    """Label values making up each summary region.

    ``whole_brain`` takes every named label that is not a fluid one (so a user bank with extra
    tissue labels, e.g. cerebellum, counts them in the whole brain).
    """
    by_name = label_values_by_name(label_names)
    out = {region: [by_name[n] for n in names if n in by_name] for region, names in SUMMARY_REGIONS.items()}
    out["whole_brain"] = sorted(
        int(v) for v, n in label_names.items() if int(v) != 0 and n not in FLUID_LABEL_NAMES
    )
    return out


def regional_volumes_ml(label_map: sitk.Image, label_names: dict[int, str]) -> dict[str, float]:
    """Volumes (mL) of the summary regions ``ventricles, hippocampus, amygdala, gm, wm, whole_brain``.

    label_map: integer label image (its spacing gives the voxel volume).
    label_names: ``{value: name}`` using the canonical names (see module docstring).
    """
    array = sitk.GetArrayViewFromImage(label_map)
    voxel_ml = float(np.prod(label_map.GetSpacing())) / 1000.0
    counts = np.bincount(np.asarray(array, dtype=np.int64).ravel().clip(min=0))
    def count(value: int) -> int:
        return int(counts[value]) if value < counts.size else 0

    return {
        region: sum(count(v) for v in values) * voxel_ml
        for region, values in summary_label_values(label_names).items()
    }


def one_hot(labels: torch.Tensor, values: list[int], dtype=torch.float32) -> torch.Tensor:
    """Indicator maps ``(R, Z, Y, X)`` of the given label values in a ``(Z, Y, X)`` label tensor."""
    return torch.stack([(labels == int(v)).to(dtype) for v in values])


def argmax_labels(region_maps: torch.Tensor, values: list[int], threshold: float = 0.5) -> torch.Tensor:
    """Hard labels from partial-volume maps ``(R, Z, Y, X)``: the largest map wins where the maps sum
    to at least ``threshold`` (else background 0).  Returns int16 ``(Z, Y, X)``."""
    lookup = torch.tensor([int(v) for v in values], dtype=torch.int16)
    best = region_maps.argmax(0)
    labels = lookup[best]
    labels[region_maps.sum(0) < threshold] = 0
    return labels


def summary_volumes_from_maps(region_maps: torch.Tensor, values: list[int], label_names: dict[int, str],
                              voxel_ml: float) -> dict[str, float]:
    """Summary-region volumes (mL) from partial-volume maps ``(R, Z, Y, X)`` of the label ``values``."""
    per_label = {int(v): float(m.sum()) * voxel_ml for v, m in zip(values, region_maps)}
    return {
        region: sum(per_label.get(v, 0.0) for v in members)
        for region, members in summary_label_values(label_names).items()
    }


def warped_regional_volumes_ml(label_map: sitk.Image, displacement: torch.Tensor,
                               label_names: dict[int, str]) -> dict[str, float]:
    """Summary-region volumes (mL) of ``label_map`` pulled back by ``id + displacement``.

    The one-hot maps are warped trilinearly and summed (partial volumes).  Prefer this to counting a
    nearest-neighbour-warped label map: displacements below half a voxel leave such a map unchanged,
    so its counts miss the sub-voxel changes of a few years of ageing.
    displacement: ``(3, Z, Y, X)`` voxel units on the label map's grid (see :mod:`inbrainsyn.fields`).
    """
    from inbrainsyn import fields

    labels = torch.from_numpy(sitk.GetArrayFromImage(label_map).astype(np.int64))
    values = sorted(int(v) for v in label_names)
    maps = fields.warp(one_hot(labels, values), displacement)
    voxel_ml = float(np.prod(label_map.GetSpacing())) / 1000.0
    return summary_volumes_from_maps(maps, values, label_names, voxel_ml)
