"""Ground-truth ageing phantom: determinism, outputs, anatomical variety, two truths and true deformations."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inbrainsyn import fields, io
from inbrainsyn.cli import main as cli_main
from inbrainsyn.errors import InputError
from inbrainsyn.phantom import (COHORT_COLUMNS, TRUTH_COLUMNS, PhantomConfig, make_phantom, nonlinear_displacement_mm,
                                read_cohort, read_truths, resample_to_grid, subject_grid)
from inbrainsyn.templates.bank import load_bank
from inbrainsyn.templates.regions import DEFAULT_BANK_LABELS

SPACING = 3.0  # mm: keeps each subject to seconds

# every test below but the argument and unit checks shares one 3-subject phantom (a minute or two of CPU)
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def bank():
    return load_bank()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, bank):
    out = tmp_path_factory.mktemp("ph") / "cohort"
    make_phantom(out, PhantomConfig(subjects=3, seed=7, spacing=SPACING, followup_years=(3.0, 6.0)), bank=bank,
                 log=lambda *_: None)
    return out


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_subject_grid_pads_the_bank_grid_symmetrically(bank):
    grid = subject_grid(bank, 2.0, pad_mm=10.0)
    extent = [(n - 1) * s for n, s in zip(grid.size, grid.spacing)]
    bank_extent = [(n - 1) * s for n, s in zip(bank.grid.size, bank.grid.spacing)]
    for e, b in zip(extent, bank_extent):
        assert b + 20.0 - 2.0 < e <= b + 20.0 + 1e-6
    centre = np.asarray(grid.origin) + grid.index_to_physical @ ((np.asarray(grid.size) - 1) / 2)
    bank_centre = np.asarray(bank.grid.origin) + bank.grid.index_to_physical @ ((np.asarray(bank.grid.size) - 1) / 2)
    assert np.allclose(centre, bank_centre, atol=1e-6)


def test_resample_to_grid_keeps_physical_positions(bank):
    """A map resampled onto the padded grid has its centre of mass at the same physical point."""
    mask = fields.image_to_tensor(bank.mask)[None]
    grid = subject_grid(bank, 3.0, pad_mm=12.0)
    out = resample_to_grid(mask, bank.grid, grid)[0].numpy()

    def centre(array, g):
        idx = np.argwhere(array > 0.5).mean(0)[::-1]  # (x, y, z)
        return np.asarray(g.origin) + g.index_to_physical @ idx

    assert np.allclose(centre(mask[0].numpy(), bank.grid), centre(out, grid), atol=1.5)
    assert out[:3].max() == 0 and out[:, :3].max() == 0  # the padding is empty


def test_nonlinear_displacement_ignores_affine_maps():
    shape = (12, 14, 16)
    x = fields.voxel_coordinates(shape, dtype=torch.float64)
    affine = (0.05 * x[[1, 2, 0]] + 1.5).float()  # linear in the coordinates: an affine map
    mask = np.ones(shape, bool)
    assert nonlinear_displacement_mm(affine, mask, 2.0)["rms_mm"] < 1e-4
    wavy = affine.clone()
    wavy[0] += torch.sin(x[2] / 2.0).float()
    assert nonlinear_displacement_mm(wavy, mask, 2.0)["rms_mm"] > 0.5


@slow
def test_phantom_writes_cohort_truths_images_labels_masks_and_fields(phantom):
    with open(phantom / "cohort.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COHORT_COLUMNS
        rows = list(reader)
    assert len(rows) == 3 * 3
    assert {r["group"] for r in rows} == {"HC", "AD", "HC->AD"}
    assert {r["input"] for r in rows} == {"head"}  # the first block of three runs with skull
    for row in read_cohort(phantom):
        image = sitk.ReadImage(row["path"])
        assert image.GetSpacing() == pytest.approx((SPACING,) * 3)
        labels, mask = _array(row["labels_path"]), _array(row["mask_path"])
        assert set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask > 0, labels > 0)
        assert set(np.unique(labels)) <= {0, *DEFAULT_BANK_LABELS}  # the bank's regions incl. cortical parcels
        stripped, head = _array(row["path"]), _array(row["head_path"])
        assert stripped[mask == 0].max() == 0  # skull-stripped
        assert head[mask == 0].mean() > 20  # skull, scalp and noise outside the brain
        assert np.array_equal(stripped[mask > 0], head[mask > 0])
        clean = _array(row["clean_path"])
        assert clean[mask == 0].max() == 0
    with open(phantom / "truths.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == TRUTH_COLUMNS
    truths = read_truths(phantom)
    assert len(truths) == 3 * 2 * 2  # subjects x follow-ups x truths
    for truth in truths:
        field, grid = io.read_field(truth["field_path"])
        assert grid.same_as(fields.Grid.from_sitk(sitk.ReadImage(truth["clean_path"])))
        assert 0.05 < fields.max_norm(field) * SPACING < 15.0


@slow
def test_anatomy_varies_as_drawn_and_is_recorded(phantom):
    info = json.loads((phantom / "phantom.json").read_text())
    for subject in info["subjects"]:
        anatomy = subject["anatomy"]
        drawn = subject["anatomy_factors"]
        ratios = anatomy["volume_ratio_to_template"]
        # the ventricles follow the drawn factor (the random warps and the ICV scale add +-25 %)
        assert abs(math.log(ratios["ventricles"] / drawn["lateral_ventricles"])) < math.log(1.35)
        assert 0.6 / 1.35 < ratios["ventricles"] < 3.0 * 1.35
        assert 0.5 / 1.35 < ratios["hippocampus"] < 1.1 * 1.35
        assert 0.85 < anatomy["icv_ml"] / anatomy["template_icv_ml"] < 1.15
        assert anatomy["min_jacobian"] > 0
        assert 1.0 < anatomy["nonlinear_displacement"]["rms_mm"] < 12.0
    # subjects differ: a spread of ventricle sizes
    vent = [s["anatomy"]["volume_ratio_to_template"]["ventricles"] for s in info["subjects"]]
    assert max(vent) != min(vent)


@slow
def test_true_field_carries_the_baseline_onto_the_followup(phantom):
    """Warping the baseline's one-hot label maps by the written true deformation changes the regional
    volumes as the phantom recorded for that truth (right direction and size), for both truths."""
    from inbrainsyn.templates.regions import one_hot

    info = {s["subject"]: s for s in json.loads((phantom / "phantom.json").read_text())["subjects"]}
    summary = {"lateral_ventricles": "ventricles", "cerebral_wm": "wm", "cortical_gm": "gm"}
    for truth in read_truths(phantom):
        sub = truth["subject"]
        base = torch.from_numpy(_array(phantom / sub / f"{sub}_scan-0_labels.nii.gz").astype(np.int64))
        field, _ = io.read_field(truth["field_path"])
        maps = one_hot(base, [1, 4, 6])
        change = torch.log(fields.warp(maps, field).sum(dim=(1, 2, 3)) / maps.sum(dim=(1, 2, 3)))
        scans = info[sub]["scans"]
        recorded = next(s for s in scans if s["scan"] == truth["scan"])["truths"][truth["truth"]]["volumes_ml"]
        for i, region in enumerate(("lateral_ventricles", "cortical_gm", "cerebral_wm")):
            key = summary[region]
            expected = math.log(recorded[key] / scans[0]["volumes_ml"][key])
            if key == "gm":  # the summary GM also holds hippocampus, amygdala and deep GM: sign only
                assert float(change[i]) < 0
                continue
            assert abs(float(change[i]) - expected) < 0.3 * abs(expected) + 0.004, (sub, truth["truth"], region)


@slow
def test_followups_change_as_prescribed_and_the_pattern_truth_differs(phantom):
    info = json.loads((phantom / "phantom.json").read_text())
    summary_of = {"hippocampus": "hippocampus", "lateral_ventricles": "ventricles", "cerebral_wm": "wm"}
    for subject in info["subjects"]:
        base_volumes = subject["scans"][0]["volumes_ml"]
        for scan in subject["scans"][1:]:
            truth = scan["truths"]["subject"]
            goals = truth["log_volume_change_goal"]
            assert truth["min_jacobian"] > 0
            for region, summary in summary_of.items():
                measured = math.log(truth["volumes_ml"][summary] / base_volumes[summary])
                # 3 mm grid (hippocampus ~ 400 voxels) and two solver rounds: 20 %
                assert abs(measured - goals[region]) <= 0.2 * abs(goals[region]) + 0.003, (subject["subject"], region)
            assert goals["hippocampus"] < 0 and goals["lateral_ventricles"] > 0
            pattern = scan["truths"]["pattern"]
            assert pattern["min_jacobian"] > 0
            assert any(k.endswith(":a") for k in pattern["log_volume_change_goal"])
            # same regional targets on average but another spatial pattern: the images differ
        sub = subject["subject"]
        last = subject["scans"][-1]["scan"]
        a = _array(phantom / sub / f"{sub}_scan-{last}_clean.nii.gz").astype(float)
        b = _array(phantom / sub / f"{sub}_scan-{last}_truth-pattern_clean.nii.gz").astype(float)
        c = _array(phantom / sub / f"{sub}_scan-0_clean.nii.gz").astype(float)
        assert np.abs(a - b).mean() > 0.1 * np.abs(a - c).mean()


@slow
def test_ad_subjects_change_more_than_hc_subjects(phantom):
    info = json.loads((phantom / "phantom.json").read_text())
    by_group = {s["group"]: s for s in info["subjects"]}
    hc = by_group["HC"]["scans"][-1]["log_volume_change_goal"]
    ad = by_group["AD"]["scans"][-1]["log_volume_change_goal"]
    assert ad["hippocampus"] < hc["hippocampus"]
    assert ad["lateral_ventricles"] > hc["lateral_ventricles"]


@slow
def test_phantom_is_deterministic_for_a_seed_and_chunks_reproduce_the_cohort(tmp_path, bank, phantom):
    config = PhantomConfig(subjects=1, seed=7, first_index=1, spacing=SPACING, followup_years=(3.0, 6.0))
    again = make_phantom(tmp_path / "again", config, bank=bank, log=lambda *_: None)
    for name in ("sub-001_scan-0_T1w.nii.gz", "sub-001_scan-2_head.nii.gz", "sub-001_scan-2_labels.nii.gz",
                 "sub-001_scan-2_truth-pattern_field.nii.gz"):
        assert np.array_equal(_array(again / "sub-001" / name), _array(phantom / "sub-001" / name)), name
    other = make_phantom(tmp_path / "other", PhantomConfig(subjects=1, seed=8, spacing=SPACING, followup_years=(3.0,),
                                                           truths=("subject",)), bank=bank, log=lambda *_: None)
    assert not np.array_equal(_array(other / "sub-000" / "sub-000_scan-0_T1w.nii.gz"),
                              _array(phantom / "sub-000" / "sub-000_scan-0_T1w.nii.gz"))
    assert {t["truth"] for t in read_truths(other)} == {"subject"}


def test_bad_phantom_arguments_are_refused(tmp_path, bank):
    with pytest.raises(InputError, match="--subjects"):
        make_phantom(tmp_path / "x", PhantomConfig(subjects=0), bank=bank)
    with pytest.raises(InputError, match="do not fit"):
        make_phantom(tmp_path / "y", PhantomConfig(subjects=1, followup_years=(40.0,), spacing=SPACING), bank=bank)
    with pytest.raises(InputError, match="truths"):
        make_phantom(tmp_path / "z", PhantomConfig(subjects=1, truths=("pattern",), spacing=SPACING), bank=bank)
    assert not (tmp_path / "y").exists()


def test_cli_refuses_existing_output(tmp_path):
    (tmp_path / "exists").mkdir()
    assert cli_main(["phantom", "-o", str(tmp_path / "exists"), "--subjects", "1"]) == 3
