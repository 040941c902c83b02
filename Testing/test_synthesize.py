"""`inbrainsyn synthesize` end to end on a phantom subject, and its age/cohort checks."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from inbrainsyn.cli import main


@pytest.fixture(scope="module")
def phantom_subject(tmp_path_factory):
    """One phantom subject at 3 mm (small, fast) with its true 4-year follow-up."""
    folder = tmp_path_factory.mktemp("phantom") / "cohort"
    assert main(["phantom", "-o", str(folder), "--subjects", "1", "--seed", "3", "--spacing", "3", "--followups", "4"]) == 0
    rows = list(csv.DictReader(open(folder / "cohort.csv")))
    return folder, rows


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "60"], "must be above the baseline age"),
        (["--targets", "120"], "beyond the template bank's last age"),
        (["--targets", "80", "--transition-age", "90"], "transition age 90"),
        (["--targets", "80", "--cohort", "AD", "--transition-age", "75"], "use it with --cohort HC"),
        (["--targets", "80", "--pace", "100"], "--pace 100 is outside 1-99"),
    ],
)
def test_ages_are_checked_before_any_work(tmp_path, capsys, phantom_subject, extra, message):
    folder, rows = phantom_subject
    image = folder / rows[0]["path"]
    age = float(rows[0]["age"])
    args = ["synthesize", str(image), "--age", str(age), "--quiet", "-o", str(tmp_path / "out")]
    if "--cohort" not in extra:
        args += ["--cohort", "HC"]
    extra = [x if x != "60" else str(age - 1) for x in extra]
    extra = [x if x != "80" else str(age + 4) for x in extra]
    extra = [x if x != "75" else str(age + 2) for x in extra]
    extra = [x if x != "90" else str(age + 9) for x in extra]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code != 0
    assert message.replace("90", f"{age + 9:g}") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_synthesize_end_to_end_on_a_phantom_subject(tmp_path, phantom_subject):
    folder, rows = phantom_subject
    baseline_row, follow_row = rows[0], rows[1]
    image = folder / baseline_row["path"]
    before = sha(image)
    age, target = float(baseline_row["age"]), float(follow_row["age"])
    cohort = "AD" if baseline_row["group"] == "AD" else "HC"
    out = tmp_path / "run"
    assert main(["synthesize", str(image), "--age", str(age), "--targets", str(target), "--cohort", cohort,
                 "--skull-stripped", "--quiet", "-o", str(out)]) == 0
    assert sha(image) == before  # the input is never modified

    manifest = json.loads((out / "manifest.json").read_text())
    kinds = {o["kind"] for o in manifest["outputs"]}
    assert {"baseline", "synthetic", "jacobian", "difference", "labels", "volumes", "report"} <= kinds
    for entry in manifest["outputs"]:
        assert (out / entry["path"]).exists(), entry
    assert set(manifest["timings_s"]) >= {"registration", "transport", "outputs", "total"}

    # every image output lies on the input's grid
    reference = sitk.ReadImage(str(image))
    synthetic = sitk.ReadImage(str(out / next(o["path"] for o in manifest["outputs"] if o["kind"] == "synthetic")))
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(synthetic, attr)(), getattr(reference, attr)(), atol=1e-5)

    # the prediction is closer to the true follow-up than the baseline is (inside the brain)
    # (both sides carry the input's noise and bias, so interpolation smoothing alone cannot win)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / follow_row["path"]))).astype(float)
    base = sitk.GetArrayFromImage(reference).astype(float)
    pred = sitk.GetArrayFromImage(synthetic).astype(float)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / follow_row["mask_path"]))) > 0
    assert np.abs(pred - truth)[mask].mean() < np.abs(base - truth)[mask].mean()

    # ageing shows in the volumes: hippocampus shrinks, ventricles grow, no folding in the atrophy map
    volumes = {(float(r["age"]), r["region"]): float(r["volume_ml"]) for r in csv.DictReader(open(out / "volumes.csv"))}
    assert volumes[(target, "hippocampus")] < volumes[(age, "hippocampus")]
    assert volumes[(target, "ventricles")] > volumes[(age, "ventricles")]
    assert volumes[(target, "whole_brain")] < volumes[(age, "whole_brain")]
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / next(o["path"] for o in manifest["outputs"] if o["kind"] == "jacobian"))))
    assert jacobian.min() > 0
    # nothing changes outside the head (issue 13): beyond 10 mm from the brain mask J = 1 within 0.01,
    # so there is no seam where the template's box ends on the input grid
    import scipy.ndimage as ndi

    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "brain_mask.nii.gz"))) > 0
    far = ndi.distance_transform_edt(~brain, sampling=tuple(reversed(reference.GetSpacing()))) > 10.0
    assert far.any() and np.abs(jacobian[far] - 1.0).max() < 0.01
    assert manifest["inputs"]["pace"] == 50.0 and manifest["parameters"]["pace"] == 50.0
