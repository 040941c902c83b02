"""Input plausibility end to end: wrong inputs are refused before any output, --force-input marks outputs.

A 4 mm copy of the shipped bank and the demo subject at 3 mm (~20 s per full run on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk

from small_bank import crop_top, make_small_bank, small_demo_subject, t2_like

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plausibility")
    bank = make_small_bank(folder / "bank")
    demo = small_demo_subject(folder / "demo.nii.gz")
    image = sitk.ReadImage(str(demo))
    sitk.WriteImage(t2_like(image), str(folder / "t2.nii.gz"))
    sitk.WriteImage(crop_top(image, 0.45), str(folder / "top45.nii.gz"))
    small = sitk.Image(image)
    small.SetSpacing([0.6 * s for s in image.GetSpacing()])  # a header with voxel sizes 0.6x the truth
    sitk.WriteImage(small, str(folder / "small.nii.gz"))
    return folder, bank


def synthesize(setup, name, out, *extra, shipped_bank=False):
    folder, bank = setup
    bank_args = [] if shipped_bank else ["--bank", str(bank)]
    return subprocess.run([sys.executable, "-m", "inbrainsyn", "synthesize", str(folder / f"{name}.nii.gz"), "--age", "70",
                           "--targets", "75", *bank_args, "-o", str(out), *extra],
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("name, message, not_in", [
    ("t2", "T1 contrast: inside the registered brain white matter is darker than grey matter", None),
    ("top45", "brain coverage: only", "no brain found"),
    ("small", "intracranial volume", "T1 contrast"),
])
def test_wrong_input_is_refused_before_any_output(tmp_path, setup, name, message, not_in):
    out = tmp_path / "out"
    proc = synthesize(setup, name, out, "--quiet")
    assert proc.returncode == 6, proc.stderr
    assert message in proc.stderr and "--force-input" in proc.stderr
    if not_in:
        assert not_in not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging, no lock file


def test_force_input_runs_and_marks_every_output(tmp_path, setup):
    out = tmp_path / "out"
    proc = synthesize(setup, "t2", out, "--json", "--force-input")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    warnings = [e["message"] for e in events if e.get("event") == "log" and e.get("level") == "warning"]
    assert any("--force-input: going on although T1 contrast" in w for w in warnings)
    manifest = json.loads((out / "manifest.json").read_text())
    checks = manifest["input_checks"]
    assert checks["forced"] is True and "contrast" in checks["failed"]
    assert {c["name"] for c in checks["checks"]} == {"coverage", "contrast", "volumes", "fit"}
    assert (out / "report.png").exists()


def test_a_plausible_t1_passes_every_check(tmp_path, setup):
    """On the shipped bank (its 1.5 mm grid is what the registration is tuned for; on the 4 mm test bank
    it inflates the labelled intracranial volume to 3516 mL, past the adult range)."""
    out = tmp_path / "out"
    proc = synthesize(setup, "demo", out, "--quiet", shipped_bank=True)
    assert proc.returncode == 0, proc.stderr
    checks = json.loads((out / "manifest.json").read_text())["input_checks"]
    assert checks["failed"] == [] and checks["forced"] is False
    assert all(c["passed"] for c in checks["checks"])
