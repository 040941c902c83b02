"""Template bank: format, validated loading, age interpolation and template ageing SVFs.

A bank is a folder holding ``bank.json`` and image files on ONE common grid::

    {
      "format": "inbrainsyn-bank-v1",
      "name": "...", "description": "...", "provenance": {...} or "...", "licence": "...",
      "mask": "mask.nii.gz",                      # brain / intracranial mask (0/1)
      "labels": "labels.nii.gz",                  # integer label map of the anatomy
      "label_names": {"1": "lateral_ventricles", "2": "hippocampus", "3": "amygdala",
                      "4": "cortical_gm", "5": "subcortical_gm", "6": "cerebral_wm", "7": "csf"},
      "cohorts": {"HC": [{"age": 55, "image": "HC_055.nii.gz", "labels": "HC_055_labels.nii.gz"}, ...],
                  "AD": [...]},
      "intensity_scale": 0.00392,                 # optional: stored value x scale = intensity
      "svfs": [{"cohort": "HC", "age_from": 55, "age_to": 65, "file": "svf_HC_055_065.nii.gz"}],  # optional
      "ageing_svfs": [{"cohort": "AD", "age_from": 55, "age_to": 65, "file": "ageing_AD_055_065.nii.gz",
                       "scale": 0.002}],           # optional
      "ageing_midpoints": [{"cohort": "AD", "age_from": 55, "age_to": 65, "file": "ageing_mid_AD_055_065.nii.gz",
                            "scale": 0.002}],      # optional, one per ageing piece
      "conversion_svfs": [{"cohort": "AD", "age_from": 55, "age_to": 65, "file": "conversion_055_065.nii.gz",
                           "scale": 0.002}],       # optional: HC template aged at AD rates, minus the AD piece
      "atrophy_model": {...}                      # optional (model banks such as the default one)
    }

Two kinds of SVF between consecutive listed ages (each ``template(a0) o exp(u)``-style, pull-back):

* ``svfs``: the *template path*: ``template(a0) o exp(u) ~ template(a1)`` (what registering two
  templates gives, e.g. for a learned bank such as AtlasGAN's).  Used to interpolate templates
  between listed ages (geodesic ``exp(s u)``) and, when no ``ageing_svfs`` are given, as the ageing.
* ``ageing_svfs``: the *individual's* ageing from ``template(a0)`` over ``a1 - a0`` years.  For HC
  the two coincide; for AD they differ: the AD template at each age is a typical mild-to-moderate
  AD patient of that age (a cross-section), while one patient ageing from a0 to a1 follows the
  longitudinal AD rates (the default model bank stores both).

``ageing_midpoints`` (optional) make ages between listed ones accurate: for an ageing piece ``u``
(age_from -> age_to, span T) the file holds ``d = u_half - u / 2``, where ``u_half`` is the ageing from
``template(age_from)`` over the first T / 2 years (solved, not scaled).  The ageing over a fraction
``s`` of the piece is then ``u(s) = s u + 4 s (1 - s) d`` (the quadratic in ``s`` through 0, ``u_half``
and ``u``) instead of ``s u``.  An interval from fraction ``s0`` to ``s1`` of one piece is
``u(s1) - u(s0)`` (``log(exp(-u(s0)) o exp(u(s1)))`` without its small bracket) when the ageing is the
template path (HC: ``template(a0)`` lies on it), and ``u(s1 - s0)`` otherwise (AD: ``template(a0)``
follows the HC-like template path, so it is aged like the listed template over the same span).  Scaling a piece by time alone misses thin regions
with small goals by up to ~30 % of the goal (the solve is not linear in ``u``, and accelerating rates
are not linear in time); see docs/templates.md section 7.

``conversion_svfs`` (optional) serve HC -> AD converters: the file holds ``c = u_conv - u_AD``, where
``u_conv`` is the HC template at age_from aged at the AD rates over the piece and ``u_AD`` the AD ageing
piece (solved on the AD template, whose hippocampus is smaller and ventricles larger).  After the
conversion age the loader ages along ``u_AD + c``; without them the AD pieces are applied to the HC
anatomy (ventricles then grow up to 30 % too much and the medial temporal lobe shrinks 20 % too little).

A stored field may lie on a coarser grid spanning the same box (same origin, direction and corner
voxel centres) and may be an integer image whose values times ``scale`` are mm; it is resampled to
the bank grid on load.  Template ageing ``u`` between two ages (``template(a0) o exp(u) ~ aged``)
comes, in order of preference, from (1) ``ageing_svfs``, (2) ``svfs`` (both composed with the BCH
formula over consecutive pieces, fractions of a piece for ages between listed ones), (3) the bank's
atrophy model solved on the template's own label map, (4) SVF registration of the two templates
(cached).  Templates between listed ages follow ``svfs`` (or the model) when available, otherwise
linear intensity blending.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields
from inbrainsyn.errors import InputError, ProcessingError
from inbrainsyn.templates import atrophy
from inbrainsyn.templates.regions import REQUIRED_LABEL_NAMES, one_hot

BANK_FORMAT = "inbrainsyn-bank-v1"
KNOWN_COHORTS = ("HC", "AD")
REQUIRED_KEYS = ("name", "description", "provenance", "licence", "cohorts", "mask", "labels", "label_names")
AGE_LIMITS = (0.0, 130.0)
AGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TemplateEntry:
    age: float
    image: Path
    labels: Path | None


def default_bank_path() -> Path:
    from inbrainsyn.paths import resource_path

    return resource_path("bank", "default")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: cannot be read as an image (NIfTI, NRRD or MHA expected)") from None
    return reader


def _grid_of(reader: sitk.ImageFileReader) -> fields.Grid:
    return fields.Grid(
        size=tuple(int(n) for n in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )


def _grid_difference(a: fields.Grid, b: fields.Grid) -> str:
    for what in ("size", "spacing", "origin", "direction"):
        if not np.allclose(getattr(a, what), getattr(b, what), atol=1e-3):
            return f"{what} {tuple(round(x, 4) for x in getattr(a, what))} vs {tuple(round(x, 4) for x in getattr(b, what))}"
    return ""


def read_bank_json(root: Path) -> dict:
    path = root / "bank.json"
    if not root.is_dir():
        raise InputError(f"{root}: template bank folder not found; give a folder holding bank.json")
    if not path.exists():
        raise InputError(f"{path}: missing; a template bank folder needs a bank.json (see docs/templates.md)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return data


def _check_file(root: Path, value, where: str, problems: list[str]) -> Path | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: expected a file name, got {value!r}")
        return None
    path = (root / value).resolve()
    if not path.exists():
        problems.append(f"{where}: file {value!r} not found in {root}")
        return None
    return path


def _parse_age(value, where: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"{where}: age must be a number of years, got {value!r}")
        return None
    if not AGE_LIMITS[0] <= value <= AGE_LIMITS[1]:
        problems.append(f"{where}: age {value} is outside {AGE_LIMITS[0]:.0f}-{AGE_LIMITS[1]:.0f} years")
        return None
    return float(value)


def validate_bank(root: Path, data: dict) -> dict:
    """Check a parsed bank.json against the files in ``root``; raise one InputError listing every problem.

    Returns the parsed pieces: entries, label_names, grid, svfs, model, files.
    """
    problems: list[str] = []
    where = root / "bank.json"
    fmt = data.get("format", BANK_FORMAT)
    if fmt != BANK_FORMAT:
        problems.append(f"format {fmt!r} is not supported (expected {BANK_FORMAT!r})")
    for key in REQUIRED_KEYS:
        if key not in data:
            problems.append(f"missing key {key!r}")
    mask = _check_file(root, data.get("mask"), "mask", problems) if "mask" in data else None
    labels = _check_file(root, data.get("labels"), "labels", problems) if "labels" in data else None

    # label names
    label_names: dict[int, str] = {}
    raw_names = data.get("label_names", {})
    if not isinstance(raw_names, dict):
        problems.append("label_names: must map label values to names, e.g. {\"1\": \"lateral_ventricles\"}")
    else:
        for key, name in raw_names.items():
            try:
                value = int(key)
            except (TypeError, ValueError):
                problems.append(f"label_names: key {key!r} is not an integer label value")
                continue
            if value <= 0:
                problems.append(f"label_names: label value {value} must be positive (0 is background)")
            label_names[value] = str(name)
        if len(set(label_names.values())) != len(label_names):
            problems.append("label_names: names must be unique")
        missing = [n for n in REQUIRED_LABEL_NAMES if n not in label_names.values()]
        if missing and "label_names" in data:
            problems.append(f"label_names: missing required region(s) {', '.join(missing)} "
                            f"(needed: {', '.join(REQUIRED_LABEL_NAMES)})")

    # cohorts
    entries: dict[str, list[TemplateEntry]] = {}
    cohorts = data.get("cohorts", {})
    if not isinstance(cohorts, dict) or (not cohorts and "cohorts" in data):
        problems.append("cohorts: must map 'HC' and/or 'AD' to a list of {\"age\": years, \"image\": file}")
        cohorts = {}
    for cohort, listing in cohorts.items():
        if cohort not in KNOWN_COHORTS:
            problems.append(f"cohorts: unknown cohort {cohort!r} (known: {', '.join(KNOWN_COHORTS)})")
            continue
        if not isinstance(listing, list) or not listing:
            problems.append(f"cohorts.{cohort}: must be a non-empty list of {{\"age\", \"image\"}} entries")
            continue
        parsed = []
        for i, item in enumerate(listing):
            tag = f"cohorts.{cohort}[{i}]"
            if not isinstance(item, dict) or "age" not in item or "image" not in item:
                problems.append(f"{tag}: each entry needs \"age\" and \"image\"")
                continue
            age = _parse_age(item["age"], tag, problems)
            image = _check_file(root, item["image"], f"{tag}.image", problems)
            lab = _check_file(root, item["labels"], f"{tag}.labels", problems) if "labels" in item else None
            if age is not None and image is not None:
                parsed.append(TemplateEntry(age, image, lab))
        ages = [e.age for e in parsed]
        if any(b <= a for a, b in zip(ages[:-1], ages[1:])):
            problems.append(f"cohorts.{cohort}: ages out of order {ages}; list them strictly increasing")
        entries[cohort] = parsed

    # optional model
    model = None
    if "atrophy_model" in data:
        try:
            model = atrophy.AtrophyModel.from_json(data["atrophy_model"], where=f"{where}: atrophy_model")
        except InputError as exc:
            problems.append(str(exc))
        if model is not None:
            for cohort, listing in entries.items():
                if any(e.labels is None for e in listing):
                    problems.append(f"cohorts.{cohort}: a bank with an atrophy_model needs \"labels\" for every template")
        if "atrophy_model" in data and cohorts and any(c not in atrophy.COHORTS for c in entries):
            problems.append("atrophy_model: cohorts must be HC/AD")

    scale = data.get("intensity_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        problems.append(f"intensity_scale: must be a positive number, got {scale!r}")

    # optional SVFs (template path and individual ageing)
    svfs: dict[tuple[str, float, float], tuple[Path, float]] = {}
    ageing_svfs: dict[tuple[str, float, float], tuple[Path, float]] = {}
    midpoints: dict[tuple[str, float, float], tuple[Path, float]] = {}
    conversions: dict[tuple[str, float, float], tuple[Path, float]] = {}
    for key_name, target in (("svfs", svfs), ("ageing_svfs", ageing_svfs), ("ageing_midpoints", midpoints),
                             ("conversion_svfs", conversions)):
        for i, item in enumerate(data.get(key_name, []) or []):
            tag = f"{key_name}[{i}]"
            if not isinstance(item, dict) or not {"cohort", "age_from", "age_to", "file"} <= set(item):
                problems.append(f"{tag}: needs cohort, age_from, age_to, file")
                continue
            if item["cohort"] not in entries:
                problems.append(f"{tag}: cohort {item['cohort']!r} has no templates in this bank")
                continue
            a0 = _parse_age(item["age_from"], tag, problems)
            a1 = _parse_age(item["age_to"], tag, problems)
            path = _check_file(root, item["file"], f"{tag}.file", problems)
            svf_scale = item.get("scale", 1.0)
            if isinstance(svf_scale, bool) or not isinstance(svf_scale, (int, float)) or not svf_scale > 0:
                problems.append(f"{tag}: scale must be a positive number (mm per stored unit), got {svf_scale!r}")
                continue
            listed = [e.age for e in entries[item["cohort"]]]
            if a0 is not None and a1 is not None:
                if not (any(abs(a0 - a) < AGE_TOLERANCE for a in listed) and any(abs(a1 - a) < AGE_TOLERANCE for a in listed)):
                    problems.append(f"{tag}: ages {a0}->{a1} must be listed template ages of {item['cohort']}")
                elif a1 <= a0:
                    problems.append(f"{tag}: age_to must exceed age_from")
            if path is not None and a0 is not None and a1 is not None:
                target[(item["cohort"], a0, a1)] = (path, float(svf_scale))

    for key in list(midpoints) + list(conversions):
        if key not in (ageing_svfs or svfs):
            problems.append(f"ageing_midpoints/conversion_svfs: {key[0]} {key[1]:g}->{key[2]:g} has no ageing piece "
                            f"({'ageing_svfs' if ageing_svfs else 'svfs'}) to refine")
    if problems:
        raise InputError(_problem_text(where, problems))

    # grids (headers only) and label content
    reference = _grid_of(_header(mask))
    files = [("mask", mask), ("labels", labels)]
    files += [(f"{c} age {e.age:g} image", e.image) for c, es in entries.items() for e in es]
    files += [(f"{c} age {e.age:g} labels", e.labels) for c, es in entries.items() for e in es if e.labels]
    for tag, path in files:
        reader = _header(path)
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            problems.append(f"{tag} ({path.name}): must be a 3D scalar image")
            continue
        diff = _grid_difference(_grid_of(reader), reference)
        if diff:
            problems.append(f"{tag} ({path.name}): grid differs from the mask's ({diff}); resample all files to one grid")
    for key, (path, _scale) in list(svfs.items()) + list(ageing_svfs.items()) + list(midpoints.items()) \
            + list(conversions.items()):
        reader = _header(path)
        if reader.GetNumberOfComponents() != 3:
            problems.append(f"svf {key} ({path.name}): must be a displacement-field image with 3 components")
        elif _grid_difference(_grid_of(reader), reference) and not _same_box(_grid_of(reader), reference):
            problems.append(f"svf {key} ({path.name}): grid differs from the mask's ({_grid_difference(_grid_of(reader), reference)}) "
                            "and does not span the same box (same origin, direction and extent)")
    if problems:
        raise InputError(_problem_text(where, problems))
    for tag, path in [("labels", labels)] + [(f"{c} age {e.age:g} labels", e.labels)
                                              for c, es in entries.items() for e in es if e.labels]:
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).astype(int).tolist()) - {0}
        unknown = sorted(values - set(label_names))
        if unknown:
            problems.append(f"{tag} ({path.name}): label values {unknown[:10]} have no name in label_names")
    mask_values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(mask))))
    if not set(mask_values.tolist()) <= {0, 1} or 1 not in mask_values:
        problems.append(f"mask ({mask.name}): must be binary 0/1 with a non-empty brain (values {mask_values[:6].tolist()})")
    if problems:
        raise InputError(_problem_text(where, problems))
    return {"entries": entries, "label_names": label_names, "grid": reference, "svfs": svfs, "ageing_svfs": ageing_svfs,
            "ageing_midpoints": midpoints, "conversion_svfs": conversions, "model": model,
            "mask": mask, "labels": labels, "scale": float(scale) if scale is not None else None}


def _same_box(a: fields.Grid, b: fields.Grid) -> bool:
    """Grids spanning the same box: same origin and direction, same corner voxel centres."""
    extent_a = np.asarray(a.spacing) * (np.asarray(a.size) - 1)
    extent_b = np.asarray(b.spacing) * (np.asarray(b.size) - 1)
    return (np.allclose(a.origin, b.origin, atol=1e-3) and np.allclose(a.direction, b.direction, atol=1e-4)
            and np.allclose(extent_a, extent_b, atol=1e-2))


def _problem_text(where: Path, problems: list[str]) -> str:
    lines = "\n  - ".join(problems)
    return f"{where}: invalid template bank ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - {lines}\nSee docs/templates.md for the format."


# ---------------------------------------------------------------------------------------------
# The bank
# ---------------------------------------------------------------------------------------------


class Bank:
    """A validated template bank (use :func:`load_bank`)."""

    def __init__(self, root: Path, data: dict, parsed: dict):
        self.root = root
        self.meta = data
        self.name: str = str(data["name"])
        self.description: str = str(data["description"])
        self.provenance = data["provenance"]
        self.licence: str = str(data["licence"])
        self.entries: dict[str, list[TemplateEntry]] = parsed["entries"]
        self.label_names: dict[int, str] = parsed["label_names"]
        self.grid: fields.Grid = parsed["grid"]
        self.model: atrophy.AtrophyModel | None = parsed["model"]
        self.intensity_scale: float | None = parsed["scale"]
        self._svf_files: dict[tuple[str, float, float], tuple[Path, float]] = parsed["svfs"]
        self._ageing_files: dict[tuple[str, float, float], tuple[Path, float]] = parsed.get("ageing_svfs", {})
        self._midpoint_files: dict[tuple[str, float, float], tuple[Path, float]] = parsed.get("ageing_midpoints", {})
        self._conversion_files: dict[tuple[str, float, float], tuple[Path, float]] = parsed.get("conversion_svfs", {})
        self._mask_path: Path = parsed["mask"]
        self._labels_path: Path = parsed["labels"]
        self._images: dict[Path, sitk.Image] = {}
        self._svf_cache: dict[tuple, torch.Tensor] = {}

    # -- basic accessors ---------------------------------------------------------------------
    @property
    def cohorts(self) -> tuple[str, ...]:
        return tuple(c for c in KNOWN_COHORTS if c in self.entries)

    def ages(self, cohort: str) -> list[float]:
        return [e.age for e in self._entries(cohort)]

    def age_range(self, cohort: str) -> tuple[float, float]:
        ages = self.ages(cohort)
        return ages[0], ages[-1]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.grid.spacing))

    @property
    def mask(self) -> sitk.Image:
        return sitk.Cast(self._read(self._mask_path), sitk.sitkUInt8)

    @property
    def labels(self) -> sitk.Image:
        """Label map of the bank's base anatomy (bank-level ``labels`` file)."""
        return sitk.Cast(self._read(self._labels_path), sitk.sitkInt16)

    def describe(self) -> str:
        lines = [f"{self.name}", f"  folder: {self.root}", f"  grid: size {self.grid.size}, spacing {self.grid.spacing} mm"]
        for c in self.cohorts:
            lines.append(f"  {c}: {len(self.entries[c])} templates, ages {', '.join(f'{a:g}' for a in self.ages(c))}")
        lines.append("  labels: " + ", ".join(f"{v}={n}" for v, n in sorted(self.label_names.items())))
        source = ("stored ageing SVFs" if self._ageing_files else "stored SVFs" if self._svf_files
                  else "atrophy model" if self.model else "registration of templates")
        lines.append(f"  template ageing from: {source}")
        lines.append(f"  licence: {self.licence}")
        lines.append(f"  {self.description}")
        return "\n".join(lines)

    def _entries(self, cohort: str) -> list[TemplateEntry]:
        if cohort not in self.entries:
            raise InputError(f"cohort {cohort!r} is not in template bank '{self.name}' (it has {', '.join(self.cohorts)})")
        return self.entries[cohort]

    def _read(self, path: Path) -> sitk.Image:
        if path not in self._images:
            self._images[path] = sitk.ReadImage(str(path))
        return self._images[path]

    def _check_age(self, cohort: str, age: float, what: str = "age") -> float:
        lo, hi = self.age_range(cohort)
        if not isinstance(age, (int, float)) or not math.isfinite(age):
            raise InputError(f"{what} must be a number of years, got {age!r}")
        if age < lo - AGE_TOLERANCE or age > hi + AGE_TOLERANCE:
            raise InputError(f"{what} {age:g} is outside the {cohort} templates' range {lo:g}-{hi:g} years of bank '{self.name}'")
        return float(min(max(age, lo), hi))

    def _bracket(self, cohort: str, age: float) -> tuple[TemplateEntry, TemplateEntry | None, float]:
        """Listed entries around ``age``: (lower, upper or None when exact, fraction in [0, 1))."""
        entries = self._entries(cohort)
        for e in entries:
            if abs(e.age - age) <= AGE_TOLERANCE:
                return e, None, 0.0
        for lower, upper in zip(entries[:-1], entries[1:]):
            if lower.age < age < upper.age:
                return lower, upper, (age - lower.age) / (upper.age - lower.age)
        raise InputError(f"age {age:g} is outside the {cohort} templates of bank '{self.name}'")

    def _listed_image(self, entry: TemplateEntry) -> torch.Tensor:
        tensor = fields.image_to_tensor(self._read(entry.image))
        return tensor * self.intensity_scale if self.intensity_scale else tensor

    def _listed_labels(self, entry: TemplateEntry) -> torch.Tensor:
        return fields.image_to_tensor(self._read(entry.labels or self._labels_path)).round().to(torch.int16)

    # -- templates ---------------------------------------------------------------------------
    def template(self, cohort: str, age: float) -> sitk.Image:
        """Template of ``cohort`` at ``age`` (float32 on :attr:`grid`), interpolated between listed ages."""
        return fields.tensor_to_image(self.template_tensor(cohort, age), self.grid)

    def template_tensor(self, cohort: str, age: float) -> torch.Tensor:
        age = self._check_age(cohort, age)
        lower, upper, fraction = self._bracket(cohort, age)
        image = self._listed_image(lower)
        if upper is None:
            return image
        step = self._step_svf(cohort, lower, upper, age)
        if step is not None:
            return fields.warp(image, fields.exp(step))
        # no ageing field available: linear intensity blend (documented limitation)
        return (1.0 - fraction) * image + fraction * self._listed_image(upper)

    def labels_at(self, cohort: str, age: float) -> sitk.Image:
        """Label map of the template of ``cohort`` at ``age`` (int16)."""
        return fields.tensor_to_image(self.labels_tensor(cohort, age), self.grid, sitk.sitkInt16)

    def labels_tensor(self, cohort: str, age: float) -> torch.Tensor:
        age = self._check_age(cohort, age)
        lower, upper, fraction = self._bracket(cohort, age)
        labels = self._listed_labels(lower)
        if upper is None:
            return labels
        step = self._step_svf(cohort, lower, upper, age)
        if step is not None:
            return fields.warp(labels.float(), fields.exp(step), mode="nearest").round().to(torch.int16)
        return labels if fraction < 0.5 else self._listed_labels(upper)

    def _step_svf(self, cohort: str, lower: TemplateEntry, upper: TemplateEntry, age: float) -> torch.Tensor | None:
        """SVF from the listed template ``lower`` to ``age`` (inside the segment), or None."""
        stored = self._svf_files.get((cohort, lower.age, upper.age))
        if stored is not None:
            return self._stored(stored) * ((age - lower.age) / (upper.age - lower.age))
        if self.model is not None:
            key = ("step", cohort, lower.age, round(float(age), 4))
            if key not in self._svf_cache:
                self._svf_cache[key] = self._model_svf(cohort, lower.age, age, None, self._listed_labels(lower))
            return self._svf_cache[key]
        return None

    # -- ageing ------------------------------------------------------------------------------
    def ageing_svf(self, cohort: str, age_from: float, age_to: float, transition_age: float | None = None,
                   device=None) -> torch.Tensor:
        """SVF ``u`` (``(3, Z, Y, X)`` voxel units on :attr:`grid`) with ``template(age_from) o exp(u) ~ template(age_to)``.

        With ``transition_age`` (HC -> AD conversion): HC ageing from ``age_from`` to the transition, then
        AD ageing to ``age_to``, starting from the HC template at ``age_from``.  Banks with stored
        ``ageing_svfs`` (the default bank) or ``svfs`` compose the HC and AD pieces with the second-order
        BCH formula; after the transition the AD pieces are corrected by ``conversion_svfs`` when the bank
        has them (the HC anatomy aged at AD rates), otherwise they are applied to the HC anatomy as if the
        AD template coincided with the HC one (approximation: the cross-cohort offset is not included).  Model banks
        without stored fields integrate the rates piecewise and solve once on the HC template's labels.
        Otherwise the templates are registered: HC(age_from) to AD(age_to).
        """
        if transition_age is not None:
            if cohort != "AD":
                raise InputError(f"a transition age is for HC -> AD conversion: the target cohort must be AD, got {cohort!r}")
            if not age_from <= transition_age <= age_to:
                raise InputError(f"transition age {transition_age:g} must lie between the ages {age_from:g} and {age_to:g}")
            start_cohort = "HC"
            self._check_age("HC", age_from, "age")
            self._check_age("HC", transition_age, "transition age")
            self._check_age("AD", transition_age, "transition age")
            self._check_age("AD", age_to, "target age")
        else:
            start_cohort = cohort
            self._check_age(cohort, age_from, "age")
            self._check_age(cohort, age_to, "target age")
        key = (cohort, round(float(age_from), 4), round(float(age_to), 4),
               None if transition_age is None else round(float(transition_age), 4))
        if key not in self._svf_cache:
            if abs(age_to - age_from) <= AGE_TOLERANCE:
                velocity = torch.zeros((3, *self.grid.shape))
            elif self._ageing_files:
                velocity = self._stored_path_svf(cohort, age_from, age_to, transition_age, self._ageing_files)
            elif self._svf_files:
                velocity = self._stored_path_svf(cohort, age_from, age_to, transition_age, self._svf_files)
            elif self.model is not None:
                velocity = self._model_svf(cohort, age_from, age_to, transition_age,
                                           self.labels_tensor(start_cohort, age_from))
            else:
                velocity = self._registered_svf(start_cohort, cohort, age_from, age_to)
            self._svf_cache[key] = velocity
        velocity = self._svf_cache[key]
        return velocity.to(device) if device is not None else velocity

    def _model_svf(self, cohort: str, age_from: float, age_to: float, transition_age, labels: torch.Tensor) -> torch.Tensor:
        values = sorted(v for v in self.label_names if bool((labels == v).any()))
        maps = one_hot(labels, values)
        targets = self.model.targets("AD" if transition_age is not None else cohort, age_from, age_to, transition_age)
        # a ~3 mm solve grid keeps this to seconds; the full-grid defect correction keeps it accurate
        solution = atrophy.solve_ageing_svf(maps, [self.label_names[v] for v in values], targets, self.spacing_zyx,
                                            balance_region=self.model.balance_region,
                                            solve_spacing_mm=max(3.0, min(self.grid.spacing)))
        return solution.velocity

    def _stored(self, stored: tuple[Path, float]) -> torch.Tensor:
        """A stored SVF on the bank grid (voxel units): scaled, and resampled from a coarser grid."""
        path, scale = stored
        if path not in self._svf_cache:
            from inbrainsyn import io

            field, grid = io.read_field(path)
            field = field * scale if scale != 1.0 else field
            if tuple(grid.size) != tuple(self.grid.size):
                field = fields.resize_field(field, self.grid.shape)
            self._svf_cache[path] = field
        return self._svf_cache[path]

    def _stored_segments(self, cohort: str, a0: float, a1: float, files=None, converter: bool = False) -> list[torch.Tensor]:
        """Velocities of the parts of the stored consecutive pieces covering a0 -> a1 (a0 < a1).

        The part of a piece ``u`` between fractions ``s0 < s1`` is ``(s1 - s0) u`` without a midpoint, and
        ``u(s1) - u(s0)`` or ``u(s1 - s0)`` with one (``u(s) = s u + 4 s (1 - s) d``, module docstring).
        """
        files = self._svf_files if files is None else files
        midpoints = self._midpoint_files if files is (self._ageing_files or self._svf_files) else {}
        entries = self._entries(cohort)
        pieces = []
        for lower, upper in zip(entries[:-1], entries[1:]):
            lo, hi = max(a0, lower.age), min(a1, upper.age)
            if hi - lo <= AGE_TOLERANCE:
                continue
            key = (cohort, lower.age, upper.age)
            stored = files.get(key)
            if stored is None:
                raise ProcessingError(f"bank '{self.name}' has no stored SVF for {cohort} {lower.age:g}->{upper.age:g}; "
                                      "add it to 'svfs' or remove all 'svfs' so templates are registered")
            span = upper.age - lower.age
            s0, s1 = (lo - lower.age) / span, (hi - lower.age) / span
            u = self._stored(stored)
            if converter and key in self._conversion_files:  # the AD rates on the HC anatomy
                u = u + self._stored(self._conversion_files[key])
            mid = midpoints.get(key)
            if mid is None:
                pieces.append(u * (s1 - s0))
                continue
            d = self._stored(mid)

            def at(s: float) -> torch.Tensor:
                return u * s + d * (4.0 * s * (1.0 - s)) if AGE_TOLERANCE < s < 1.0 - AGE_TOLERANCE else u * s

            if s0 <= AGE_TOLERANCE:
                pieces.append(at(s1))
            elif self._svf_files.get(key, (None,))[0] == stored[0]:
                # the ageing is the template path (HC): template(a0) lies on it, so take the path's difference
                # log(exp(-u(s0)) o exp(u(s1))) = u(s1) - u(s0) - [u(s0), u(s1)] / 2 + ...; the bracket is
                # (s0 c1 - s1 c0) [u, d] with the small d, negligible (and 2 s of gradients under load)
                pieces.append(at(s1) - at(s0))
            else:
                # the ageing leaves the template path (AD: template(a0) is the HC-like path, not AD(lower) aged
                # at AD rates): age template(a0) like the listed template over the same span (fresh start)
                pieces.append(at(s1 - s0))
        return pieces

    def _stored_path_svf(self, cohort: str, age_from: float, age_to: float, transition_age, files=None) -> torch.Tensor:
        """Compose stored pieces: ``log(exp(p1) o exp(p2) o ...)`` ~ BCH order 2, pairwise."""
        if transition_age is None:
            legs = [(cohort, age_from, age_to)]
        else:
            legs = [("HC", age_from, transition_age), ("AD", transition_age, age_to)]
        pieces = []
        for leg_cohort, a, b in legs:
            forward = self._stored_segments(leg_cohort, min(a, b), max(a, b), files,
                                            converter=transition_age is not None and leg_cohort == "AD")
            pieces += forward if b >= a else [-p for p in reversed(forward)]
        total = pieces[0]
        for piece in pieces[1:]:
            total = fields.bch(total, piece, order=2)
        return total

    def _registered_svf(self, start_cohort: str, cohort: str, age_from: float, age_to: float) -> torch.Tensor:
        try:
            from inbrainsyn.registration import register_svf
        except ImportError as exc:  # pragma: no cover - registration ships with the engine
            raise ProcessingError(f"bank '{self.name}' has neither an atrophy model nor SVFs, and registration "
                                  f"is unavailable ({exc})") from None
        fixed = self.template_tensor(cohort, age_to)
        moving = self.template_tensor(start_cohort, age_from)
        mask = fields.image_to_tensor(self.mask)
        result = register_svf(fixed, moving, self.grid.spacing, mask=mask)
        return result.velocity


def load_bank(path: str | Path | None = None) -> Bank:
    """Load and validate a template bank folder (``None``: the shipped default bank)."""
    root = Path(path).expanduser().resolve() if path is not None else default_bank_path()
    data = read_bank_json(root)
    parsed = validate_bank(root, data)
    return Bank(root, data, parsed)
