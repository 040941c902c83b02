"""Input plausibility checks: each with an input that trips it and one that passes (synthetic arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from inbrainsyn import fields, plausibility as pl
from inbrainsyn.errors import ImplausibleInputError
from inbrainsyn.progress import Reporter

NAMES = {1: "lateral_ventricles", 2: "hippocampus", 3: "amygdala", 4: "cortical_gm", 5: "subcortical_gm",
         6: "cerebral_wm", 7: "csf"}


def grid(size, spacing=2.0, origin=(0.0, 0.0, 0.0)):
    return fields.Grid(size=size, spacing=(spacing,) * 3, origin=origin, direction=tuple(np.eye(3).ravel()))


def test_coverage_whole_and_top_part():
    template = grid((20, 20, 20))
    mask = np.zeros((20, 20, 20))
    mask[2:18, 2:18, 2:18] = 1  # (Z, Y, X)
    identity, zero = np.eye(3), np.zeros(3)
    assert pl.brain_coverage(template, template, mask, identity, zero) == 1.0
    # an input whose field of view (z from 21 to 39 mm) holds the brain's slices 11..17 of 2..17 (mm = 2 k)
    top = grid((20, 20, 9), origin=(0.0, 0.0, 22.0))
    fraction = pl.brain_coverage(top, template, mask, identity, zero)
    assert fraction == pytest.approx(7 / 16, abs=1e-6)
    assert not pl.check_coverage(fraction).passed
    assert "44% of the template's brain lies inside the input's field of view" in pl.check_coverage(fraction).message
    assert pl.check_coverage(1.0).passed
    # the affine matters: the same input, the brain shifted up by the affine, is covered again
    shift = np.array([0.0, 0.0, 20.0])  # brain z 4..34 mm -> 22..37 mm
    assert pl.brain_coverage(top, template, mask, 0.5 * identity, shift) == 1.0


def phantom_labels(shape=(24, 24, 24)):
    """Nested shells: CSF outside, cortical GM, WM core with ventricles in the middle."""
    z, y, x = np.indices(shape)
    r = np.sqrt(((np.stack([z, y, x]) - (np.array(shape)[:, None, None, None] - 1) / 2) ** 2).sum(0))
    labels = np.zeros(shape, np.int16)
    labels[r < 11] = 7
    labels[r < 9.5] = 4
    labels[r < 7] = 6
    labels[r < 3] = 1
    return labels


def image_with(labels, csf, gm, wm, noise=0.03, seed=0):
    rng = np.random.default_rng(seed)
    values = np.zeros(8, np.float32)
    values[[1, 7]] = csf
    values[4] = gm
    values[6] = wm
    return values[labels] + rng.normal(0, noise, labels.shape).astype(np.float32) * (labels > 0)


@pytest.mark.parametrize("name, levels, passes", [
    ("T1", (0.25, 0.6, 0.9), True),
    ("T1 weak GM/WM", (0.25, 0.75, 0.9), True),
    ("T2", (1.0, 0.6, 0.35), False),
    ("FLAIR", (0.15, 0.8, 0.55), False),
    ("PD", (0.85, 0.95, 0.75), False),
    ("T1 without GM/CSF contrast", (0.58, 0.6, 0.9), False),
])
def test_contrast_check_tells_t1_from_other_contrasts(name, levels, passes):
    labels = phantom_labels()
    margins = pl.contrast_margins(pl.tissue_medians(image_with(labels, *levels), labels, NAMES))
    result = pl.check_contrast(margins)
    assert result.passed is passes, (name, margins)
    if not passes:
        assert "T1 contrast" in result.message and "T1-weighted" in result.message


def test_contrast_check_without_tissues_fails_with_a_message():
    result = pl.check_contrast(pl.contrast_margins(pl.tissue_medians(np.ones((8, 8, 8)), np.zeros((8, 8, 8)), NAMES)))
    assert not result.passed and "could not be found" in result.message


# The bank template's own volumes for these tests: the first (2 mm CSF shell) bank's MNI152 values, on
# which the adult ranges were set (ICV 1050-2400, brain 800-2100 mL).
TEMPLATE_VOLUMES = {"intracranial_ml": 2070.0, "brain_ml": 1701.0}


def test_volume_ranges_follow_the_banks_own_template():
    ranges = pl.volume_ranges_ml(TEMPLATE_VOLUMES)
    assert ranges["intracranial_ml"] == pytest.approx([1050.0, 2400.0])
    assert ranges["brain_ml"] == pytest.approx([800.0, 2100.0])
    # a bank whose labels add a wider CSF shell (larger ICV) widens the ICV range in proportion
    wider = pl.volume_ranges_ml({"intracranial_ml": 2337.0, "brain_ml": 1701.0})
    assert wider["intracranial_ml"][1] == pytest.approx(2400.0 * 2337.0 / 2070.0)
    assert pl.check_volumes({"intracranial_ml": 2403.0, "brain_ml": 1500.0},
                            {"intracranial_ml": 2337.0, "brain_ml": 1701.0}).passed
    assert not pl.check_volumes({"intracranial_ml": 2403.0, "brain_ml": 1500.0}, TEMPLATE_VOLUMES).passed


def test_volume_check():
    labels = phantom_labels()
    tissue = int(((labels > 0) & (labels != 7) & (labels != 1)).sum())
    adult = pl.subject_volumes_ml(labels, NAMES, voxel_ml=1200.0 / tissue)
    assert adult["brain_ml"] == pytest.approx(1200.0)
    assert pl.check_volumes(adult, TEMPLATE_VOLUMES).passed
    # the same head with voxel sizes 1.5x too large in the header: 3.4x the volume
    wrong = pl.subject_volumes_ml(labels, NAMES, voxel_ml=1.5 ** 3 * 1200.0 / tissue)
    result = pl.check_volumes(wrong, TEMPLATE_VOLUMES)
    assert not result.passed and "voxel size in the image header" in result.message
    small = pl.check_volumes({"intracranial_ml": 400.0, "brain_ml": 300.0}, TEMPLATE_VOLUMES)
    assert not small.passed and "intracranial volume 400 mL" in small.message and "brain volume 300 mL" in small.message


def test_fit_check():
    assert pl.check_fit(0.6).passed
    for bad in (0.1, float("nan")):
        result = pl.check_fit(bad)
        assert not result.passed and "no brain found" in result.message


class Recorder(Reporter):
    def __init__(self):
        super().__init__()
        self.logs = []

    def log(self, message, level="info"):
        self.logs.append((level, message))


def test_enforce_stops_or_marks():
    results = [pl.check_coverage(1.0), pl.check_fit(0.1), pl.check_volumes({"intracranial_ml": 5000.0, "brain_ml": 4000.0}, TEMPLATE_VOLUMES)]
    with pytest.raises(ImplausibleInputError) as info:
        pl.enforce(results, force=False)
    text = str(info.value)
    assert "no brain found" in text and "intracranial volume 5000 mL" in text and "--force-input" in text
    assert info.value.exit_code == 6
    recorder = Recorder()
    assert pl.enforce(results, force=True, reporter=recorder) == results
    assert [level for level, _ in recorder.logs] == ["warning", "warning"]
    entry = pl.manifest_entry(results, force=True)
    assert entry["forced"] and entry["failed"] == ["fit", "volumes"] and len(entry["checks"]) == 3
    assert "RUN AGAINST FAILED INPUT CHECKS (fit, volumes" in pl.report_note(results, True)
    passing = [pl.check_coverage(1.0), pl.check_fit(0.6)]
    assert pl.enforce(passing, force=False) == passing
    assert pl.manifest_entry(passing, force=True)["forced"] is False and pl.report_note(passing, True) == ""
