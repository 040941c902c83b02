"""Read an engine run's ``manifest.json`` (format: docs/CONTRACTS.md) into plain Python objects.

Plain Python (json, csv, pathlib): no MRML, no Qt, so it is imported both inside Slicer and by pytest.
Every problem is reported as :class:`ManifestError` naming the file and what is wrong, because a
half-understood result folder must never reach the scene.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_KINDS = ("baseline", "synthetic", "jacobian", "difference", "labels")
COHORTS = ("HC", "AD")


class ManifestError(Exception):
    """The engine's output folder is missing, incomplete or not in the documented format."""


@dataclass(frozen=True)
class ImageOutput:
    """One image written by the engine: its kind, the age it shows (years), its cohort, its file."""

    kind: str
    age: float
    cohort: str
    path: Path


@dataclass(frozen=True)
class RegionalVolumes:
    """``volumes.csv`` reshaped to one row per age: ``volumes_ml[region][i]`` belongs to ``ages[i]``."""

    ages: list[float]
    cohorts: list[str]
    regions: list[str]
    volumes_ml: dict[str, list[float]]


@dataclass
class Manifest:
    """What one run made, read from its ``manifest.json``.

    ``images`` holds every image output (absolute paths); ``volumes`` the regional volumes table,
    or None when the run wrote none.
    """

    path: Path
    command: str
    inputs: dict
    parameters: dict
    images: list[ImageOutput] = field(default_factory=list)
    volumes: RegionalVolumes | None = None
    report_path: Path | None = None
    labels: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def baseline_age(self) -> float:
        return float(self.inputs["age"])

    def images_of_kind(self, kind: str) -> list[ImageOutput]:
        """Images of one kind sorted by age (years, ascending)."""
        return sorted((img for img in self.images if img.kind == kind), key=lambda img: img.age)

    def baseline(self) -> ImageOutput | None:
        found = self.images_of_kind("baseline")
        return found[0] if found else None

    def target_ages(self) -> list[float]:
        return [img.age for img in self.images_of_kind("synthetic")]


def _as_age(value, where: str) -> float:
    try:
        age = float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: age {value!r} is not a number") from None
    if not math.isfinite(age):
        raise ManifestError(f"{where}: age {value!r} is not finite")
    return age


def read_regional_volumes(csv_path: Path) -> RegionalVolumes:
    """Read ``volumes.csv`` (columns ``age,cohort,region,volume_ml``, one row per age x region).

    Returns one row per distinct age (ascending); every age must list every region exactly once,
    otherwise the table and the plot would silently disagree.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ManifestError(f"cannot read regional volumes {csv_path}: {exc.strerror}") from None
    needed = {"age", "cohort", "region", "volume_ml"}
    if not rows or not needed.issubset(rows[0].keys()):
        raise ManifestError(f"{csv_path}: expected columns {sorted(needed)} and at least one row")
    by_age: dict[float, dict[str, float]] = {}
    cohort_of_age: dict[float, str] = {}
    regions: list[str] = []
    for line_number, row in enumerate(rows, start=2):
        where = f"{csv_path} line {line_number}"
        age = _as_age(row["age"], where)
        region = row["region"].strip()
        try:
            volume = float(row["volume_ml"])
        except ValueError:
            raise ManifestError(f"{where}: volume_ml {row['volume_ml']!r} is not a number") from None
        if region not in regions:
            regions.append(region)
        per_region = by_age.setdefault(age, {})
        if region in per_region:
            raise ManifestError(f"{where}: region {region!r} listed twice for age {age}")
        per_region[region] = volume
        cohort_of_age[age] = row["cohort"].strip()
    ages = sorted(by_age)
    for age in ages:
        missing = [r for r in regions if r not in by_age[age]]
        if missing:
            raise ManifestError(f"{csv_path}: age {age} lacks regions {missing}")
    return RegionalVolumes(
        ages=ages,
        cohorts=[cohort_of_age[a] for a in ages],
        regions=regions,
        volumes_ml={r: [by_age[a][r] for a in ages] for r in regions},
    )


def read_manifest(manifest_path) -> Manifest:
    """Parse and check ``manifest.json``: required keys, known kinds, files present on disk.

    Raises ManifestError (message names the file) when anything needed by the scene is missing.
    """
    path = Path(manifest_path).resolve()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {path}: the engine did not finish writing its results") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    for key in ("inputs", "outputs"):
        if key not in data:
            raise ManifestError(f"{path}: missing key {key!r}")
    inputs = data["inputs"]
    if "age" not in inputs:
        raise ManifestError(f"{path}: inputs has no 'age'")
    _as_age(inputs["age"], f"{path} inputs")
    manifest = Manifest(
        path=path,
        command=str(data.get("command", "")),
        inputs=inputs,
        parameters=data.get("parameters", {}) or {},
        labels=data.get("labels", {}) or {},
    )
    for index, output in enumerate(data["outputs"]):
        where = f"{path} outputs[{index}]"
        kind = output.get("kind")
        if "path" not in output:
            raise ManifestError(f"{where}: no 'path'")
        file_path = (path.parent / output["path"]).resolve()
        if kind in IMAGE_KINDS:
            if not file_path.is_file():
                raise ManifestError(f"{where}: file {file_path} is missing")
            cohort = str(output.get("cohort", inputs.get("cohort", "")))
            manifest.images.append(ImageOutput(kind, _as_age(output.get("age"), where), cohort, file_path))
        elif kind == "volumes":
            manifest.volumes = read_regional_volumes(file_path)
        elif kind == "report":
            manifest.report_path = file_path if file_path.is_file() else None
        # Unknown kinds are ignored: a newer engine may write more than this module shows.
    if not manifest.images_of_kind("synthetic"):
        raise ManifestError(f"{path}: lists no synthetic image")
    return manifest


def read_preview_outputs(manifest_path) -> dict:
    """Images of a ``daninet preview`` run: ``{"strip": Path|None, "slices": {age: Path}}``.

    The strip is the output whose kind mentions "strip" (else the first PNG); per-target slices
    are image outputs with an age. Raises ManifestError when the run left no picture at all.
    """
    path = Path(manifest_path).resolve()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no preview manifest at {path}") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read preview manifest {path}: {exc}") from None
    strip, first_png, slices = None, None, {}
    for output in data.get("outputs", []):
        if "path" not in output:
            continue
        file_path = (path.parent / output["path"]).resolve()
        if not file_path.is_file():
            continue
        kind = str(output.get("kind", ""))
        if "strip" in kind and strip is None:
            strip = file_path
        elif file_path.suffix.lower() == ".png" and first_png is None and output.get("age") is None:
            first_png = file_path
        if output.get("age") is not None and "strip" not in kind:
            slices[_as_age(output["age"], str(path))] = file_path
    strip = strip or first_png
    if strip is None and not slices:
        raise ManifestError(f"{path}: the preview wrote no image")
    return {"strip": strip, "slices": slices}


def has_alignment(manifest_path) -> bool:
    """Whether an engine manifest records the affine alignment of its input (``diagnostics.affine_matrix``
    and ``affine_offset``, written by ``synthesize`` and ``daninet preview``), which a later preview of
    the same volume can reuse (``--alignment``)."""
    try:
        data = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
        diagnostics = data["diagnostics"]
        return diagnostics.get("affine_matrix") is not None and diagnostics.get("affine_offset") is not None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
