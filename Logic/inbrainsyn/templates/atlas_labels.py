"""AAL region labels on the bank's own anatomy (MNI152 2009a), and the atrophy model's parcels.

The AAL atlas (Tzourio-Mazoyer 2002) was drawn on one brain, the Colin27 single subject
(``ch2.nii.gz`` / ``ch2bet.nii.gz`` of Debian's mricron-data, on the same grid as ``aal.nii.gz``).
Resampling AAL onto MNI152 2009a with the identity transform would put Colin27's hippocampus at
MNI coordinates, not the average's.  :func:`aal_on_mni` carries the labels through a NONLINEAR
registration of the brain they were drawn on onto the bank's anatomy: affine (SimpleITK, mutual
information) then our SVF registration (:mod:`inbrainsyn.registration`, LNCC), with the default
parameters (nothing was tuned on Colin27: this is its one product use).  :func:`label_quality`
measures the result against the MNI tissue maps.

Parcels: AAL labels are grouped into the regions of the regional atrophy model
(:data:`CORTICAL_PARCELS`): medial temporal (hippocampus, amygdala, parahippocampal gyrus =
entorhinal / parahippocampal), lateral temporal, posterior cingulate + precuneus, inferior parietal,
frontal, insula, sensorimotor, occipital; other cortex (anterior / mid cingulate, superior parietal,
Heschl, olfactory, cerebellar cortex) stays ``cortical_gm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

# AAL (116-label version of mricron-data) values of each parcel of the atrophy model.
AAL_PARCELS: dict[str, tuple[int, ...]] = {
    "entorhinal_parahippocampal": (39, 40),
    "lateral_temporal": (55, 56, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90),  # fusiform, sup/mid/inf temporal, poles
    "posterior_cingulate_precuneus": (35, 36, 67, 68),
    "inferior_parietal": (61, 62, 63, 64, 65, 66),  # inferior parietal, supramarginal, angular
    "frontal": (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 20, 23, 24, 25, 26, 27, 28),
    "insula": (29, 30),
    "sensorimotor": (1, 2, 17, 18, 57, 58, 69, 70),  # pre/postcentral, Rolandic operculum, paracentral
    "occipital": (43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54),  # calcarine, cuneus, lingual, occipital
}
AAL_HIPPOCAMPUS = (37, 38)
AAL_AMYGDALA = (41, 42)
AAL_SUBCORTICAL = (71, 72, 73, 74, 75, 76, 77, 78)  # caudate, putamen, pallidum, thalamus
CORTICAL_PARCELS: tuple[str, ...] = tuple(AAL_PARCELS)
AAL_CEREBRAL_CORTEX = tuple(v for v in range(1, 91) if v not in AAL_SUBCORTICAL + AAL_HIPPOCAMPUS + AAL_AMYGDALA)


def _unit(image: sitk.Image) -> sitk.Image:
    """Float image divided by its 99th percentile of non-zero voxels."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    scale = float(np.percentile(values[values > 0], 99)) if (values > 0).any() else 1.0
    return sitk.Clamp(image / scale, sitk.sitkFloat32, 0.0, 1.5)


@dataclass
class CarriedLabels:
    """AAL on the MNI grid by identity, affine-only and affine + SVF (nonlinear) registration."""

    identity: sitk.Image
    affine: sitk.Image
    nonlinear: sitk.Image
    similarity: float
    min_jacobian: float


def aal_on_mni(mni_brain: sitk.Image, mni_mask: sitk.Image, aal: sitk.Image, colin_brain: sitk.Image,
               registration_spacing_mm: float = 1.5, seed: int = 0) -> CarriedLabels:
    """Carry AAL from Colin27 onto ``mni_brain``'s grid (nearest neighbour through affine + SVF)."""
    from inbrainsyn import fields
    from inbrainsyn.registration import affine_register
    from inbrainsyn.registration.images import register_images

    fixed = _unit(mni_brain)
    moving = _unit(colin_brain)
    transform = affine_register(fixed, moving, fixed_mask=sitk.Cast(mni_mask > 0, sitk.sitkUInt8), seed=seed)
    # the SVF registration on a ~1.5 mm grid of the MNI box (the bank's resolution)
    size = [int(round((n - 1) * s / registration_spacing_mm)) + 1 for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing((registration_spacing_mm,) * 3)
    reference.SetOrigin(fixed.GetOrigin())
    reference.SetDirection(fixed.GetDirection())
    fixed_r = sitk.Resample(sitk.SmoothingRecursiveGaussian(fixed, 0.25 * registration_spacing_mm), reference,
                            sitk.Transform(), sitk.sitkLinear, 0.0)
    moving_r = sitk.Resample(sitk.SmoothingRecursiveGaussian(moving, 0.25 * registration_spacing_mm), reference,
                             transform, sitk.sitkLinear, 0.0)
    mask_r = sitk.Resample(sitk.Cast(mni_mask > 0, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    result = register_images(fixed_r, moving_r, fixed_mask=sitk.BinaryDilate(mask_r, [4, 4, 4]), seed=seed)
    # x -> A(x + d(x)): the SVF displacement (mm, on the reference grid) then the affine
    displacement = sitk.Cast(fields.field_to_sitk(result.displacement, fields.Grid.from_sitk(reference)),
                             sitk.sitkVectorFloat64)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(transform)
    composite.AddTransform(sitk.DisplacementFieldTransform(displacement))

    def carry(tf) -> sitk.Image:
        return sitk.Resample(aal, mni_brain, tf, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    return CarriedLabels(identity=carry(sitk.Transform()), affine=carry(transform), nonlinear=carry(composite),
                         similarity=float(result.similarity), min_jacobian=float(result.min_jacobian))


def label_quality(aal_on_grid: sitk.Image, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """Overlap of carried AAL labels with the MNI tissue maps (probabilities in [0, 1]).

    * ``cortex_gm_mean``: mean MNI GM probability inside the AAL cerebral cortical labels;
    * ``cortex_dice``: Dice of the AAL cerebral cortex with the MNI cerebral GM (p > 0.5, above the
      cerebellum's lowest AAL slice is not enforced: GM of the cerebellum counts as unlabelled);
    * ``hippocampus_gm_mean`` / ``amygdala_gm_mean`` / ``deep_gm_mean``: mean GM+WM-free probability
      (GM) inside those labels; ``outside_brain``: fraction of AAL voxels outside the MNI brain.
    """
    labels = sitk.GetArrayFromImage(aal_on_grid).astype(np.int32)
    cortex = np.isin(labels, AAL_CEREBRAL_CORTEX)
    cerebral_gm = (gm > 0.5) & np.isin(labels, (0,) + AAL_CEREBRAL_CORTEX) & ~np.isin(labels, range(91, 117))
    # GM voxels labelled cerebellum or deep GM are not cortical GM: only compare where AAL is 0 or cortex
    inter = float((cortex & cerebral_gm).sum())
    dice = 2.0 * inter / float(cortex.sum() + cerebral_gm.sum())

    def mean_in(values, which):
        sel = np.isin(labels, which)
        return float(values[sel].mean()) if sel.any() else float("nan")

    return {
        "cortex_gm_mean": mean_in(gm, AAL_CEREBRAL_CORTEX),
        "cortex_dice": dice,
        "hippocampus_gm_mean": mean_in(gm, AAL_HIPPOCAMPUS),
        "amygdala_gm_mean": mean_in(gm, AAL_AMYGDALA),
        "deep_gm_mean": mean_in(gm, AAL_SUBCORTICAL),
        "cortex_wm_mean": mean_in(wm, AAL_CEREBRAL_CORTEX),
        "outside_brain": float(((labels > 0) & ~brain).sum()) / float((labels > 0).sum()),
    }


def nearest_cortical_parcel(aal: np.ndarray, cortex: np.ndarray, spacing_zyx) -> np.ndarray:
    """Parcel index (1-based into :data:`CORTICAL_PARCELS`; 0 = other cortex) of every voxel of
    ``cortex``: the parcel of the nearest AAL cortical label (GM voxels AAL missed get their nearest
    neighbour's label, so the cortical ribbon of MNI is fully parcellated)."""
    parcel_of_aal = np.zeros(256, np.int16)
    for i, name in enumerate(CORTICAL_PARCELS, start=1):
        parcel_of_aal[list(AAL_PARCELS[name])] = i
    labelled = np.isin(aal, AAL_CEREBRAL_CORTEX + tuple(range(91, 117)))  # cortex and cerebellum are both "cortex"
    _, index = ndi.distance_transform_edt(~labelled, sampling=spacing_zyx, return_indices=True)
    nearest = aal[tuple(index)]
    return np.where(cortex, parcel_of_aal[nearest], 0).astype(np.int16)
