"""Bad input to ``inbrainsyn synthesize``: a clear message, a non-zero exit code, nothing written, input untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inbrainsyn.cli import main


def write(array, path, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32), isVector=False)
    image.SetSpacing(tuple(spacing[: image.GetDimension()]) + (1.0,) * (image.GetDimension() - 3))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def brainish(tmp_path):
    rng = np.random.default_rng(0)
    return write(rng.uniform(0, 1, (24, 24, 24)), tmp_path / "in.nii.gz")


def write_text(path, text):
    path.write_text(text)
    return path


def run_cli(args, capsys):
    code = main(["synthesize", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BASE = ["--age", "70", "--targets", "75", "--cohort", "HC", "--quiet"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.nii.gz", "no such file"),
        (lambda d: write_text(d / "notes.nii.gz", "hello"), "cannot be read"),
        (lambda d: write(np.ones((30, 30)) * np.arange(30), d / "flat.nii.gz"), "is 2D"),
        (lambda d: write(np.random.rand(2, 12, 12, 12), d / "four.nii.gz"), "is 4D"),
        (lambda d: write(np.where(np.random.rand(12, 12, 12) > 0.5, np.nan, 1.0), d / "nan.mha"), "NaN"),
        (lambda d: write(np.full((12, 12, 12), 3.0), d / "constant.nii.gz"), "constant"),
        (lambda d: write(np.random.rand(12, 12, 12), d / "huge.nii.gz", spacing=(50.0, 50.0, 50.0)), "spacing"),
    ],
)
def test_unusable_input_is_refused_with_a_clear_message(tmp_path, capsys, make, message):
    path = make(tmp_path)
    out = tmp_path / "out"
    code, text = run_cli([path, *BASE, "-o", out], capsys)
    assert code != 0
    assert message in text
    assert str(path.name) in text
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys, brainish):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = run_cli([brainish, *BASE, "-o", out], capsys)
    assert code == 3
    assert "--overwrite" in text
    assert (out / "keep.txt").read_text() == "precious"


def test_json_mode_reports_errors_as_a_json_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "inbrainsyn", "synthesize", str(tmp_path / "missing.nii"), *BASE, "--json", "-o", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["event"] == "error" and "no such file" in last["message"]
