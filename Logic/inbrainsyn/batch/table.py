"""The cohort table of ``inbrainsyn batch``: read it and list every problem before any work starts.

One row per subject (header names are case-insensitive; other columns are ignored)::

    subject,input,age,cohort,targets,transition_age,skull_stripped
    sub-01,scans/sub-01.nii.gz,70,HC,75 80,,
    sub-01-AD,scans/sub-01.nii.gz,70,AD,75 80,,
    sub-02,dicom/sub-02/,66.5,HC,71.5;76.5,70,yes

``input``: a NIfTI/NRRD/MHA file or a DICOM series folder (relative paths are relative to the
table's folder); ``targets``: one or more ages separated by spaces or semicolons; ``transition_age``
(optional): HC -> AD conversion age (with cohort HC); ``skull_stripped`` (optional): yes/no, true/false, 1/0.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from inbrainsyn.errors import InputError

REQUIRED = ("subject", "input", "age", "cohort", "targets")
OPTIONAL = ("transition_age", "skull_stripped")
TRUE, FALSE = {"1", "yes", "y", "true", "t"}, {"", "0", "no", "n", "false", "f"}
# Names the batch writes into its output folder: a subject may not be called like them.
RESERVED = {"batch_manifest.json", "cohort_volumes.csv", "cohort_report.png", ".inbrainsyn-batch"}
SUBJECT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class CohortRow:
    """One subject of the table (line: its line number in the file, for messages)."""

    line: int
    subject: str
    input: Path
    age: float
    cohort: str
    targets: list[float]
    transition_age: float | None = None
    skull_stripped: bool = False


def _number(text: str, what: str, where: str, problems: list[str]) -> float | None:
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{where}: {what} {text!r} is not a number of years")
        return None
    if value != value or value in (float("inf"), float("-inf")):
        problems.append(f"{where}: {what} {text!r} is not a finite number")
        return None
    return value


def read_table(path: str | Path) -> tuple[list[CohortRow], list[str]]:
    """Rows that parsed and every problem found (missing columns, bad values, duplicate subjects)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such cohort table (a CSV file with columns {', '.join(REQUIRED)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a UTF-8 CSV file ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                         f"{', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})")
    rows, problems, seen = [], [], {}
    for number, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # blank line
        where = f"line {number}"
        subject = row["subject"]
        if not subject:
            problems.append(f"{where}: empty subject id")
        elif not SUBJECT_PATTERN.match(subject) or subject in RESERVED:
            problems.append(f"{where}: subject id {subject!r} cannot name a folder (use letters, digits, '.', '_' "
                            "and '-', starting with a letter or digit)")
        elif subject.lower() in seen:
            problems.append(f"{where}: subject {subject!r} is already on line {seen[subject.lower()]} "
                            "(ids must be unique; give each cohort's run its own id, e.g. sub-01-HC and sub-01-AD)")
        else:
            seen[subject.lower()] = number
        age = _number(row["age"], "age", where, problems) if row["age"] else None
        if not row["age"]:
            problems.append(f"{where}: empty age")
        cohort = row["cohort"].upper()
        if cohort not in ("HC", "AD"):
            problems.append(f"{where}: cohort {row['cohort']!r} must be HC or AD")
        targets = []
        for token in re.split(r"[\s;]+", row["targets"]):
            if token:
                value = _number(token, "target age", where, problems)
                if value is not None:
                    targets.append(value)
        if not row["targets"]:
            problems.append(f"{where}: no target ages (e.g. \"75 80\")")
        transition = None
        if row.get("transition_age"):
            transition = _number(row["transition_age"], "transition age", where, problems)
        skull = row.get("skull_stripped", "").lower()
        if skull not in TRUE | FALSE:
            problems.append(f"{where}: skull_stripped {row.get('skull_stripped')!r} must be yes or no")
        image = Path(row["input"]).expanduser() if row["input"] else None
        if image is None:
            problems.append(f"{where}: empty input path")
        elif not image.is_absolute():
            image = path.parent / image
        if subject and image is not None and age is not None and cohort in ("HC", "AD") and targets:
            rows.append(CohortRow(number, subject, image.absolute(), age, cohort, targets, transition, skull in TRUE))
    if not rows and not problems:
        problems.append(f"{path}: the table has no subjects")
    return rows, problems


def check_readable(image: Path) -> str | None:
    """Why ``image`` cannot be read as an image (header only: cheap), or None."""
    import SimpleITK as sitk

    if not image.exists():
        return f"{image}: no such file or folder"
    try:
        if image.is_dir():
            if not sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(image)):
                return f"{image}: folder holds no DICOM series"
            return None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image))
        reader.ReadImageInformation()
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        return f"{image}: cannot be read as an image ({last[:160]})"
    return None
