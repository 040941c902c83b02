"""Longitudinal cohort -> axial slice frames for DaniNet.

``cohort.csv`` has columns ``subject, scan, age, group, path`` (one row per scan; ``path``
relative to the CSV's folder or absolute) and optionally ``transition_age`` (the phantom's
HC->AD converters: their scans before the transition age get DaniNet's MCI class, from it on AD;
see :func:`scan_class`). Every scan must already be aligned with the
template (the phantom cohort is generated on the template grid); a scan on another grid is
resampled onto the reference grid (identity transform, linear interpolation), which is correct
only if it is already aligned in physical space. Each volume is normalised to [0, 1]
(:func:`geometry.normalise_intensity`) and the axial slices ``band[0], band[0]+stride, ...,
band[1]`` are cut and put into the 128x128 frame.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry
from inbrainsyn.errors import InputError

REQUIRED_COLUMNS = ("subject", "scan", "age", "group", "path")


@dataclasses.dataclass
class Scan:
    subject: str
    scan: str
    age: float
    group: str
    path: Path
    transition_age: float | None = None

    @property
    def dx(self) -> int:
        return scan_class(self.group, self.age, self.transition_age)


def scan_class(group: str, age: float, transition_age: float | None) -> int:
    """DaniNet diagnosis class of one scan: the group's class, except that a converter with a
    known transition age is MCI before it and AD from it on."""
    d = cond.diagnosis_class(group)
    if d == 2 and transition_age is not None and age >= transition_age:
        return 3
    return d


@dataclasses.dataclass
class SliceSet:
    """N frames with their labels. frames (N, 1, S, S) in [-1, 1]; the rest (N,) arrays."""

    frames: torch.Tensor
    subject: np.ndarray  # str
    scan: np.ndarray  # str
    age: np.ndarray  # float
    dx: np.ndarray  # int class index
    slice_index: np.ndarray  # int

    def __len__(self) -> int:
        return self.frames.shape[0]

    def subset(self, rows: np.ndarray) -> "SliceSet":
        rows = np.asarray(rows)
        return SliceSet(self.frames[torch.as_tensor(rows)], self.subject[rows], self.scan[rows],
                        self.age[rows], self.dx[rows], self.slice_index[rows])

    def subject_codes(self) -> np.ndarray:
        """Integer id per row (same subject, same code)."""
        return np.unique(self.subject, return_inverse=True)[1]


def read_cohort(csv_path: str | Path) -> list[Scan]:
    """Parse cohort.csv; clear errors for missing columns, bad ages, missing files."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"cohort file not found: {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)}; "
                             f"need {', '.join(REQUIRED_COLUMNS)}")
        rows = list(reader)
    scans = []
    for n, row in enumerate(rows, start=2):
        try:
            age = float(row["age"])
        except ValueError:
            raise InputError(f"{csv_path} line {n}: age {row['age']!r} is not a number") from None
        path = Path(row["path"])
        if not path.is_absolute():
            path = csv_path.parent / path
        if not path.is_file():
            raise InputError(f"{csv_path} line {n}: image not found: {path}")
        cond.diagnosis_class(row["group"])  # validate early
        t_raw = (row.get("transition_age") or "").strip()
        try:
            transition = float(t_raw) if t_raw and t_raw.lower() not in ("nan", "none") else None
        except ValueError:
            raise InputError(f"{csv_path} line {n}: transition_age {t_raw!r} is not a number") from None
        scans.append(Scan(row["subject"], row["scan"], age, row["group"], path, transition))
    if not scans:
        raise InputError(f"{csv_path} lists no scans")
    return scans


def load_on_grid(path: Path, reference: sitk.Image | None) -> sitk.Image:
    """Read a scalar 3D image; resample it onto ``reference``'s grid when the grids differ."""
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if img.GetDimension() != 3:
        raise InputError(f"{path} is {img.GetDimension()}D; DaniNet needs 3D volumes")
    if reference is None or same_grid(img, reference):
        return img
    return sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def default_band(depth: int) -> tuple[int, int]:
    """Default axial band: 30%-65% of the depth (basal ganglia, hippocampi, lateral ventricles)."""
    return int(round(0.30 * depth)), int(round(0.65 * depth))


def build_slice_set(scans: list[Scan], band: tuple[int, int] | None, stride: int,
                    reference: sitk.Image | None = None, progress: bool = False,
                    frame_size: int = geometry.FRAME_SIZE) -> tuple[SliceSet, sitk.Image, tuple[int, int]]:
    """Load all scans, cut the band's slices -> (SliceSet, reference grid image, band)."""
    frames, meta = [], []
    it = scans
    if progress:
        from tqdm import tqdm
        it = tqdm(scans, desc="loading scans", unit="scan")
    for s in it:
        img = load_on_grid(s.path, reference)
        if reference is None:
            reference = img
        vol = geometry.normalise_intensity(sitk.GetArrayFromImage(img))
        if band is None:
            band = default_band(vol.shape[0])
        geometry.check_slice_index(band[0], vol.shape[0])
        geometry.check_slice_index(band[1], vol.shape[0])
        ks = list(range(band[0], band[1] + 1, stride))
        frames.append(geometry.to_frame(vol[ks], frame_size))
        meta += [(s.subject, s.scan, s.age, s.dx, k) for k in ks]
    subj, scan, age, dx, k = zip(*meta)
    ss = SliceSet(torch.cat(frames), np.array(subj), np.array(scan), np.array(age, dtype=np.float64),
                  np.array(dx, dtype=np.int64), np.array(k, dtype=np.int64))
    return ss, reference, band


def split_subjects(subjects: list[str], holdout: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of unique subjects into (train, held-out)."""
    uniq = sorted(set(subjects))
    if holdout >= len(uniq):
        raise InputError(f"cannot hold out {holdout} of {len(uniq)} subjects; lower --holdout")
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(uniq, size=holdout, replace=False).tolist()) if holdout > 0 else []
    return [s for s in uniq if s not in held], held
