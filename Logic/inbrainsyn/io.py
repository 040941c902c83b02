"""Reading, validating and atomically writing images and fields (ITK geometry kept).

Every file the engine reads goes through :func:`read_image` or :func:`read_field`, so that bad input
gets one clear message naming the file and what to do; every file it writes goes through
:func:`write_image` (temporary file + rename) or :func:`staged_output_dir` (temporary folder moved
into place at the end), so a failure never leaves half-written outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inbrainsyn.errors import InputError, OutputExistsError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Spacing outside this range (mm) is almost surely a broken header, not a brain MRI.
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series; give a NIfTI/NRRD/MHA file or a DICOM series folder")
    if len(series) > 1:
        raise InputError(
            f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series[:4])}...); "
            "put the T1 series alone in a folder"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def read_any(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read an image file or a DICOM series folder; a clear error when it is missing or unreadable."""
    path = Path(path)
    label = name or str(path)
    if not path.exists():
        raise InputError(f"{label}: no such file or folder")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputError(
            f"{label}: cannot be read as an image ({first[:200]}); "
            f"give a NIfTI, NRRD or MHA file or a DICOM series folder"
        ) from None


def validate_scalar_volume(image: sitk.Image, label: str) -> sitk.Image:
    """Check that ``image`` is a usable 3D scalar volume; returns it as float32.

    Rejects 2D/4D images, vector images, NaN/Inf, empty or constant volumes and absurd spacing.
    A 4D image whose last axis has length 1 is accepted as 3D (common in NIfTI exports).
    """
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(
            f"{label}: is {image.GetDimension()}D (size {image.GetSize()}); a single 3D T1-weighted volume is needed"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{label}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar (grey-level) 3D volume is needed"
        )
    if min(image.GetSize()) < 8:
        raise InputError(f"{label}: size {image.GetSize()} is too small for a 3D brain volume (need >= 8 voxels per axis)")
    spacing = image.GetSpacing()
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise InputError(
            f"{label}: voxel spacing {tuple(round(s, 4) for s in spacing)} mm is outside "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm; fix the header (spacing in mm)"
        )
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{label}: contains {bad} NaN or infinite voxels; fix or mask them before use")
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise InputError(f"{label}: is empty or constant (all voxels {float(array.min()) if array.size else 'n/a'}); no anatomy to use")
    return sitk.Cast(image, sitk.sitkFloat32)


def read_image(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read and validate a 3D scalar volume (file or DICOM folder) as float32."""
    label = name or str(path)
    return validate_scalar_volume(read_any(path, label), label)


def read_label_map(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read a 3D integer label map."""
    label = name or str(path)
    image = read_any(path, label)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{label}: a label map must be a 3D scalar image")
    return sitk.Cast(image, sitk.sitkInt16)


def read_field(path: str | os.PathLike, name: str | None = None):
    """Read an ITK displacement-field image as ``(voxel-unit field (3, Z, Y, X), Grid)``."""
    from inbrainsyn import fields

    label = name or str(path)
    image = read_any(path, label)
    try:
        field, grid = fields.field_from_sitk(image, name=label)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not np.isfinite(field.numpy()).all():
        raise InputError(f"{label}: field contains NaN or infinite vectors")
    return field, grid


def _temporary_sibling(path: Path) -> Path:
    """An empty temporary file beside ``path`` with the usual permissions (mkstemp makes it 0600)."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# gzip level of a .nii.gz by pixel type (measured on the demo subject's 1 mm outputs, 2 cores):
# integer maps (labels, masks) shrink 70x at level 1 for 0.04 s; float32 images (synthetic scans,
# differences, Jacobians, fields) keep ~93% of their size at any level for 0.6 s of CPU each, so
# they are stored (level 0: a valid gzip stream, read by every NIfTI reader, CRC-checked).
INTEGER_GZIP_LEVEL = 1
FLOAT_GZIP_LEVEL = 0


def gzip_level(image: sitk.Image) -> int:
    """The gzip level :func:`write_image` uses for ``image`` (integer pixels 1, floating-point 0)."""
    floating = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}
    return FLOAT_GZIP_LEVEL if image.GetPixelID() in floating else INTEGER_GZIP_LEVEL


def _write_nifti_gz(image: sitk.Image, path: Path, level: int) -> None:
    """``.nii.gz`` with our gzip level (SimpleITK's NIfTI writer ignores the level it is given)."""
    import gzip

    plain = _temporary_sibling(path.with_name(path.name[: -len(".gz")]))
    try:
        sitk.WriteImage(image, str(plain), False)
        with open(plain, "rb") as source, open(path, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw, mtime=0) as target:
                shutil.copyfileobj(source, target, 1 << 22)
    finally:
        plain.unlink(missing_ok=True)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename over ``path``.

    ``.nii.gz`` files are gzipped at :func:`gzip_level` (compression only where it pays); other
    formats use SimpleITK's compression when ``compress``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if compress and path.name.lower().endswith(".nii.gz"):
            _write_nifti_gz(image, tmp, gzip_level(image))
        else:
            sitk.WriteImage(image, str(tmp), compress)
    return Path(path)


def write_json(data, path: str | os.PathLike) -> Path:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(path)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; say how to proceed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; choose another output or pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def staged_output_dir(outdir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``outdir``; on success move it to ``outdir``, on failure delete it.

    An existing ``outdir`` is refused unless ``overwrite`` (then it is replaced only after the new
    results are complete, so a failed run leaves the old results intact).
    """
    outdir = Path(outdir).absolute()
    check_output_path(outdir, overwrite)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-", dir=outdir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if outdir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
        os.replace(outdir, trash / "old")
        os.replace(staging, outdir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, outdir)
