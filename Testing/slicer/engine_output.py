"""Write a small engine output folder in the documented format (docs/CONTRACTS.md), with SimpleITK.

Used by the Slicer-side tests until / besides the real ``inbrainsyn synthesize``, and by the fake
engine script. The phantom is an ellipsoidal "brain" (grey shell 0.45, white core 0.7) with a central "ventricle"
(0.1) whose radius grows with age, on a 32 x 28 x 24 grid with non-trivial spacing, origin and an
oblique direction, so that geometry mistakes (LPS/RAS, axis order) show.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZE_XYZ = (32, 28, 24)
SPACING = (1.1, 0.9, 1.3)
ORIGIN = (-20.0, 15.0, 7.0)
REGIONS = ("ventricles", "hippocampus", "amygdala", "gm", "wm", "whole_brain")


def oblique_direction() -> tuple:
    """A rotation of 20 degrees about (1, 2, 3)/|.|: every matrix entry non-zero."""
    rotation = sitk.VersorRigid3DTransform()
    rotation.SetRotation((1.0, 2.0, 3.0), math.radians(20.0))
    return rotation.GetMatrix()


def reference_image(size_xyz=SIZE_XYZ, spacing=SPACING) -> sitk.Image:
    image = sitk.Image(size_xyz, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    image.SetDirection(oblique_direction())
    return image


def phantom_array(ventricle_radius: float, size_xyz=SIZE_XYZ) -> np.ndarray:
    """(Z, Y, X) float32 phantom: ellipsoid brain with a spherical ventricle of the given radius.

    Radii are in voxels of the default 32 x 28 x 24 grid and scale with ``size_xyz``.
    """
    scale = size_xyz[0] / SIZE_XYZ[0]
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size_xyz[::-1]), indexing="ij")
    cz, cy, cx = (np.array(size_xyz[::-1], dtype=np.float32) - 1) / 2
    radius2 = ((x - cx) / (13 * scale)) ** 2 + ((y - cy) / (11 * scale)) ** 2 + ((z - cz) / (9 * scale)) ** 2
    brain = radius2 <= 1
    ventricle = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= (ventricle_radius * scale) ** 2
    array = np.zeros(size_xyz[::-1], np.float32)
    array[brain] = 0.45  # "grey matter" shell
    array[radius2 <= 0.6] = 0.7  # "white matter" core
    array[ventricle] = 0.1
    # A marker near voxel (x=3, y=4, z=5) breaks every symmetry, to catch flipped axes.
    array[5, 4, 3] = 1.0
    return array


def _write(array: np.ndarray, path: Path, size_xyz=SIZE_XYZ, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference_image(size_xyz, spacing))
    sitk.WriteImage(image, str(path))


def ventricle_radius(age: float, baseline_age: float) -> float:
    return 3.0 + 0.12 * (age - baseline_age)


def write_engine_output(outdir, age=70.0, cohort="HC", targets=(75.0, 80.0), transition_age=None,
                        write_volumes=True, input_image="/data/subject_T1.nii.gz", size_xyz=SIZE_XYZ,
                        spacing=SPACING) -> Path:
    """Write baseline, synthetic, Jacobian and difference images, volumes.csv and manifest.json.

    Returns the manifest path. With ``transition_age``, targets at or after it are labelled AD.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    outputs = [{"kind": "baseline", "age": age, "cohort": cohort, "path": "baseline.nii.gz"}]
    baseline = phantom_array(ventricle_radius(age, age), size_xyz)
    _write(baseline, outdir / "baseline.nii.gz", size_xyz, spacing)
    rows = []

    def add_rows(a, c, arr):
        brain_ml = float((arr > 0.05).sum()) * voxel_ml
        vent_ml = float(np.isclose(arr, 0.1).sum()) * voxel_ml
        values = {"ventricles": vent_ml, "hippocampus": 0.004 * brain_ml * (1 - 0.004 * (a - age)),
                  "amygdala": 0.0015 * brain_ml * (1 - 0.003 * (a - age)), "gm": 0.5 * (brain_ml - vent_ml),
                  "wm": 0.5 * (brain_ml - vent_ml), "whole_brain": brain_ml - vent_ml}
        rows.extend({"age": a, "cohort": c, "region": r, "volume_ml": round(values[r], 6)} for r in REGIONS)

    add_rows(age, cohort, baseline)
    for target in targets:
        target_cohort = "AD" if transition_age is not None and target >= transition_age else cohort
        tag = f"age{target:05.1f}"
        synthetic = phantom_array(ventricle_radius(target, age), size_xyz)
        _write(synthetic, outdir / f"synthetic_{tag}.nii.gz", size_xyz, spacing)
        # Jacobian: > 1 where the ventricle grew, slightly < 1 in the brain elsewhere.
        jacobian = np.where(synthetic > 0.05, 0.97, 1.0).astype(np.float32)
        jacobian[np.isclose(synthetic, 0.1)] = 1.15
        _write(jacobian, outdir / f"jacobian_{tag}.nii.gz", size_xyz, spacing)
        _write(synthetic - baseline, outdir / f"difference_{tag}.nii.gz", size_xyz, spacing)
        outputs += [
            {"kind": "synthetic", "age": target, "cohort": target_cohort, "path": f"synthetic_{tag}.nii.gz"},
            {"kind": "jacobian", "age": target, "cohort": target_cohort, "path": f"jacobian_{tag}.nii.gz"},
            {"kind": "difference", "age": target, "cohort": target_cohort, "path": f"difference_{tag}.nii.gz"},
        ]
        add_rows(target, target_cohort, synthetic)
    if write_volumes:
        with open(outdir / "volumes.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["age", "cohort", "region", "volume_ml"])
            writer.writeheader()
            writer.writerows(rows)
        outputs.append({"kind": "volumes", "path": "volumes.csv"})
    manifest = {
        "tool": "inbrainsyn", "command": "synthesize", "version": "0.1.0", "created": "2025-01-01T00:00:00",
        "device": "cpu",
        "inputs": {"image": input_image, "age": age, "cohort": cohort, "transition_age": transition_age,
                   "targets": list(targets)},
        "parameters": {"method": "pole"}, "timings_s": {}, "versions": {},
        "outputs": outputs,
        "labels": {},
        # as the real engine: the affine A (template mm -> input mm), A(p) = M p + t
        "diagnostics": {"affine_matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                        "affine_offset": [0.0, 0.0, 0.0]},
    }
    path = outdir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path
