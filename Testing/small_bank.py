"""A coarse copy of the shipped default bank (fast end-to-end runs in tests) and a coarse demo subject."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import SimpleITK as sitk

from inbrainsyn.templates.bank import default_bank_path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "Resources" / "demo" / "subject.nii.gz"


def resample_to(image: sitk.Image, spacing: float, interpolator) -> sitk.Image:
    size = [max(8, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    origin_shift = [(spacing - s) / 2.0 for s in image.GetSpacing()]  # keep the field of view centred
    direction = image.GetDirection()
    origin = [o + sum(direction[3 * r + c] * origin_shift[c] for c in range(3)) for r, o in enumerate(image.GetOrigin())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, origin, (spacing,) * 3, direction, 0,
                         image.GetPixelID())


def make_small_bank(folder: Path, spacing: float = 4.0) -> Path:
    """Every image of the default bank resampled to ``spacing`` mm (labels and mask by nearest neighbour)."""
    source = default_bank_path()
    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads((source / "bank.json").read_text())
    # Stored SVFs (template-to-template and ageing) live on their own grids, which a resampled bank
    # would no longer match: the small bank takes its ageing from the bank's atrophy model instead
    # (solved at run time, cheap at this spacing).
    stored = {entry["file"] for key in ("svfs", "ageing_svfs", "ageing_midpoints", "conversion_svfs") for entry in data.pop(key, [])}
    for path in source.glob("*.nii.gz"):
        if path.name in stored:
            continue
        is_label = path.name.endswith("_labels.nii.gz") or path.name in ("labels.nii.gz", "mask.nii.gz")
        image = sitk.ReadImage(str(path))
        small = resample_to(image, spacing, sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
        sitk.WriteImage(small, str(folder / path.name))
    data.setdefault("provenance", {})["spacing_mm"] = spacing
    (folder / "bank.json").write_text(json.dumps(data, indent=1))
    for extra in source.iterdir():
        if extra.suffix not in (".gz", ".json") and extra.is_file():
            shutil.copy(extra, folder / extra.name)
    return folder


def small_demo_subject(path: Path, spacing: float = 3.0) -> Path:
    """The shipped demo subject (synthetic, skull on) resampled to ``spacing`` mm."""
    sitk.WriteImage(resample_to(sitk.ReadImage(str(DEMO)), spacing, sitk.sitkLinear), str(path))
    return path


def t2_like(image: sitk.Image) -> sitk.Image:
    """T1 contrast inverted inside the head (WM dark, CSF bright), as the issue's T2-like test scan."""
    import numpy as np

    a = sitk.GetArrayFromImage(image).astype(np.float32)
    head = a > 0.1 * np.percentile(a, 99)
    top = np.percentile(a[head], 99)
    out = sitk.GetImageFromArray(np.where(head, np.clip(top - a, 0, None) + 0.1 * top, a).astype(np.float32))
    out.CopyInformation(image)
    return out


def crop_top(image: sitk.Image, keep: float) -> sitk.Image:
    """Keep the top ``keep`` fraction of the head (the superior part), as a scan with a short field of view."""
    import numpy as np

    oriented = sitk.DICOMOrient(image, "LPS")  # index z increases towards superior
    a = sitk.GetArrayViewFromImage(oriented)
    head = np.where((a > 0.1 * np.percentile(a, 99)).any(axis=(1, 2)))[0]
    first = int(round(head.max() - keep * (head.max() - head.min())))
    return oriented[:, :, first:]
