"""What the module's self-test runs on, shared with pytest (Testing/slicer/test_slicer_self_test.py).

The input is realistic and small: the engine's shipped demo subject (``Resources/demo/subject.nii.gz``:
a synthetic T1 with skull at 70 years, 1 mm, 197 x 233 x 189) resampled to ``SPACING_MM`` isotropic,
so that the real engine with the shipped template bank accepts it (brain found, registration
converges) and a run to two target ages takes well under a minute on a laptop CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .engine import ENGINE_ENVIRONMENT_VARIABLE

SPACING_MM = 3.0
DEMO_AGE = 70.0


def engine_missing_reason() -> str | None:
    """Why the self-test cannot run the real engine here (None: it can)."""
    if os.environ.get(ENGINE_ENVIRONMENT_VARIABLE, "").strip():
        return None
    if importlib.util.find_spec("inbrainsyn") is None:
        return ("the InBrainSyn engine is not installed in this Python; press 'Install dependencies' in the "
                "InBrainSyn module (or set INBRAINSYN_ENGINE), then run the self-test again")
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed; install it with the PyTorch extension (or 'Install dependencies')"
    return None


def demo_subject_path() -> Path:
    """The demo subject shipped with the engine."""
    from inbrainsyn.paths import resource_path

    path = resource_path("demo", "subject.nii.gz")
    if not path.is_file():
        raise FileNotFoundError(f"the engine's demo subject is missing ({path}); reinstall the engine")
    return path


def write_small_demo_subject(path, spacing_mm: float = SPACING_MM) -> Path:
    """The demo subject resampled to ``spacing_mm`` (linear, after a matching Gaussian blur), as ``path``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(demo_subject_path()), sitk.sitkFloat32)
    old = image.GetSpacing()
    sigma = [max(0.0, (spacing_mm ** 2 - s ** 2)) ** 0.5 / 2.355 for s in old]  # FWHM of the new voxel
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma)
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), old)]
    small = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                          (spacing_mm,) * 3, image.GetDirection(), 0.0, sitk.sitkFloat32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(small, str(path))
    return path
