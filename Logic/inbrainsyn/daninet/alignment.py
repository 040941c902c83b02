"""Bringing a native-space T1 onto the DaniNet model's template grid, fast.

The slice preview needs only the affine ``A`` (template physical points -> input physical points,
ITK registration convention: ``on_template(q) = input(A q)``). Two ways to get it:

* reuse one the product already has (:func:`read_alignment`): the ``manifest.json`` of an earlier
  ``inbrainsyn synthesize`` run of the same scan (``diagnostics.affine_matrix`` / ``affine_offset``,
  ``A(p) = M p + t``), or an ITK transform file in the same convention. No registration at all.
* otherwise a coarse affine (:func:`coarse_alignment`): the pipeline's Mattes-MI rigid + affine
  restricted to the template's dilated brain mask, at 8 and 4 mm only. A preview is a slice at
  the template's 1.5 mm grid; a 12-parameter map is fixed by coarse structure, and the 2 mm level
  the full pipeline adds changes slice placement by a fraction of a slice (measured in
  ``benchmarks/bench_daninet_preview.py``) while costing most of the time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inbrainsyn.errors import InputError

# A grid is "the same" when sizes match and spacing/origin/direction agree to this (mm or cosines).
GEOMETRY_TOLERANCE = 1e-3


def affine_from_parts(matrix, offset) -> sitk.AffineTransform:
    """The ITK transform ``p -> M p + t`` (centre at the origin)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in np.asarray(matrix, dtype=np.float64).reshape(9)))
    transform.SetTranslation(tuple(float(v) for v in np.asarray(offset, dtype=np.float64).reshape(3)))
    return transform


def geometry(image) -> tuple:
    """``(size, spacing, origin, direction)`` of an image or of an image file reader."""
    return (tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def file_geometry(path: Path) -> tuple:
    """:func:`geometry` of an image file, read from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return geometry(reader)


def same_grid(a: tuple, b: tuple) -> bool:
    """Whether two geometries share size, and spacing/origin/direction within GEOMETRY_TOLERANCE."""
    return a[0] == b[0] and all(np.allclose(x, y, atol=GEOMETRY_TOLERANCE) for x, y in zip(a[1:], b[1:]))


def read_alignment(path: str | Path, native: sitk.Image) -> sitk.Transform:
    """The affine ``A`` (template mm -> input mm) saved by an earlier run of the same scan.

    ``path``: a ``manifest.json`` written by ``inbrainsyn synthesize`` (its ``baseline.nii.gz``, when
    present beside it, must have ``native``'s grid: an alignment of another scan is refused) or by
    ``inbrainsyn daninet preview`` (which records the input's grid: checked the same way), or an
    ITK transform file (``.tfm``, ``.txt``, ``.h5``, ``.mat``) mapping template physical points to
    input physical points, as ITK registration returns it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"alignment file not found: {path} (give the manifest.json of an earlier "
                         "'inbrainsyn synthesize' run of this scan, or an ITK transform file)")
    if path.suffix.lower() == ".json":
        try:
            manifest = json.loads(path.read_text())
            diagnostics = manifest["diagnostics"]
            transform = affine_from_parts(diagnostics["affine_matrix"], diagnostics["affine_offset"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} holds no affine alignment (expected the manifest.json of an "
                             f"'inbrainsyn synthesize' run with diagnostics.affine_matrix/affine_offset): {exc}") from None
        recorded = diagnostics.get("input_geometry")  # a preview's manifest records the grid it aligned
        baseline = path.parent / "baseline.nii.gz"
        theirs = None
        if isinstance(recorded, dict):
            try:
                theirs = tuple(tuple(recorded[k]) for k in ("size", "spacing", "origin", "direction"))
            except (KeyError, TypeError) as exc:
                raise InputError(f"{path}: diagnostics.input_geometry is incomplete ({exc}); "
                                 "drop --alignment to align this scan afresh") from None
        elif baseline.is_file():
            theirs = file_geometry(baseline)
        if theirs is not None:
            ours = geometry(native)
            if not same_grid(theirs, ours):
                raise InputError(
                    f"the alignment in {path} belongs to another scan: its input had size {theirs[0]}, "
                    f"origin {tuple(round(v, 2) for v in theirs[2])}; the input has size {ours[0]}, origin "
                    f"{tuple(round(v, 2) for v in ours[2])}. Drop --alignment to align this scan afresh")
        return transform
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path} as an ITK transform ({str(exc).strip().splitlines()[-1][:160]})") from None


def coarse_alignment(native: sitk.Image, template: sitk.Image, brain_mask: sitk.Image, seed: int = 0) -> sitk.Transform:
    """Affine ``A`` (template mm -> input mm) from Mattes-MI rigid + affine at 8 and 4 mm only.

    The input is robustly normalised and the metric restricted to the template's brain mask dilated
    by 10 mm, as in the full pipeline, so skull and neck do not pull the fit.
    """
    from inbrainsyn.registration import AffineConfig, affine_register
    from inbrainsyn.synthesis import dilate_mask, normalise_intensity

    config = AffineConfig(level_spacings_mm=(8.0, 4.0), smoothing_mm=(4.0, 2.0), rigid_iterations=100,
                          affine_iterations=100, threads=2)
    return affine_register(template, normalise_intensity(native), fixed_mask=dilate_mask(brain_mask, 10.0),
                           config=config, seed=seed)


def alignment_record(transform: sitk.Transform, native: sitk.Image) -> dict:
    """What a manifest records so that :func:`read_alignment` can reuse ``transform`` for ``native``:
    ``affine_matrix`` / ``affine_offset`` (``A(p) = M p + t``, template mm -> input mm, as
    ``inbrainsyn synthesize`` writes them) and the input's grid (``input_geometry``)."""
    from inbrainsyn.native import affine_parts

    matrix, offset = affine_parts(transform)
    size, spacing, origin, direction = geometry(native)
    return {"affine_matrix": matrix.tolist(), "affine_offset": offset.tolist(),
            "input_geometry": {"size": list(size), "spacing": list(spacing), "origin": list(origin),
                               "direction": list(direction)}}


def to_template_grid(native: sitk.Image, template: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """The input resampled (linear) onto the template grid through ``A``; float32, 0 outside."""
    return sitk.Resample(sitk.Cast(native, sitk.sitkFloat32), template, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
