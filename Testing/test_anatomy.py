"""The subject's own anatomy (inbrainsyn.anatomy): tissue refinement, cohort independence, placement, fit record."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inbrainsyn import anatomy, fields

NAMES = {1: "lateral_ventricles", 4: "cortical_gm", 6: "cerebral_wm", 7: "csf"}
INTENSITY = {0: 0.0, 1: 0.15, 4: 0.55, 6: 0.85, 7: 0.15}
SPACING = 2.0
COARSE_MM = 4.0  # grid of the end-to-end tests (the default bank is 1.5 mm)


def ball_brain(ventricle_mm: float, n: int = 48, skull: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels and intensities of a ball brain: ventricle, WM, GM ribbon, CSF shell (+ a skull shell)."""
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * SPACING] * 3, indexing="ij")
    r = np.sqrt(x**2 + (1.15 * y) ** 2 + z**2)
    labels = np.zeros((n, n, n), np.int16)
    labels[r < 40] = 7
    labels[r < 37] = 4
    labels[r < 32] = 6
    labels[r < ventricle_mm] = 1
    image = np.vectorize(INTENSITY.get)(labels).astype(np.float32)
    if skull:
        image[(r >= 42) & (r < 46)] = 0.35  # bone/diploe-like: must not become grey matter
    return labels, image


def acquire(image: np.ndarray, seed: int) -> torch.Tensor:
    """Partial-volume blur, a smooth 10 % bias and Gaussian noise."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    n = image.shape[0]
    ramp = np.linspace(-1, 1, n)
    bias = 1.0 + 0.1 * ramp[None, None, :]
    out = ndi.gaussian_filter(image, 0.5) * bias + rng.normal(0, 0.02, image.shape)
    return torch.from_numpy(out.astype(np.float32)).clamp_min(0)


def volume_ml(labels: np.ndarray, value: int) -> float:
    return float((labels == value).sum()) * SPACING**3 / 1000.0


def test_tissue_refinement_recovers_a_ventricle_the_registration_missed():
    """Template ventricle 8 mm, subject's 14 mm, registration captured nothing (identity): the registered
    labels keep the template's ventricle, the refined maps find the subject's (within 10 %), and GM / WM
    stay within 10 % despite bias, noise and a skull-like shell."""
    template_labels, template_image = ball_brain(8.0, skull=False)
    subject_labels, subject_image = ball_brain(14.0)
    subject = acquire(subject_image, seed=1)
    spacing = (SPACING,) * 3
    own = anatomy.subject_anatomy(subject, torch.from_numpy(template_labels), None, NAMES, spacing,
                                  reference_image=torch.from_numpy(template_image))
    volumes = own.volumes_ml()
    registered_only = anatomy.subject_anatomy(subject, torch.from_numpy(template_labels), None, NAMES, spacing,
                                              anatomy.AnatomyConfig(use_intensities=False)).volumes_ml()
    truth_v = volume_ml(subject_labels, 1)
    assert abs(registered_only["ventricles"] / truth_v - 1) > 0.5  # the failure being fixed
    assert abs(volumes["ventricles"] / truth_v - 1) < 0.10, (volumes["ventricles"], truth_v)
    assert abs(volumes["gm"] / volume_ml(subject_labels, 4) - 1) < 0.10
    assert abs(volumes["wm"] / volume_ml(subject_labels, 6) - 1) < 0.10
    assert float(own.maps.sum(0).max()) <= 1.0 + 1e-5 and float(own.maps.min()) >= 0.0
    # the optional CSF/WM partial-volume class (off by default: worse on the training phantoms, docs/anatomy.md)
    # removes the rim of CSF/WM voxels that look like grey matter here
    with_pv = anatomy.subject_anatomy(subject, torch.from_numpy(template_labels), None, NAMES, spacing,
                                      anatomy.AnatomyConfig(partial_volume_weight=1.0),
                                      reference_image=torch.from_numpy(template_image)).volumes_ml()
    assert abs(with_pv["ventricles"] / truth_v - 1) < abs(volumes["ventricles"] / truth_v - 1)


def test_relative_refinement_keeps_the_registered_labels_where_subject_and_template_agree():
    """Subject = template: the refinement changes nothing (the label definition is the template's)."""
    labels, image = ball_brain(10.0, skull=False)
    own = anatomy.subject_anatomy(torch.from_numpy(image), torch.from_numpy(labels), None, NAMES, (SPACING,) * 3,
                                  reference_image=torch.from_numpy(image))
    assert torch.allclose(own.maps, own.registered, atol=1e-5)
    assert own.volumes_ml()["ventricles"] == pytest.approx(volume_ml(labels, 1), rel=1e-4)


def test_within_class_shares_extend_to_the_nearest_labelled_voxel():
    maps = torch.zeros((3, 1, 1, 12))
    maps[0, 0, 0, :3] = 1.0  # lateral ventricles (CSF class) on the left
    maps[1, 0, 0, 9:] = 1.0  # outer CSF on the right
    maps[2, 0, 0, 3:9] = 1.0  # WM in between: no CSF label there
    shares = anatomy.within_class_shares(maps, ["csf", "csf", "wm"], (1.0, 1.0, 1.0))
    assert shares[0, 0, 0, 4] == 1.0 and shares[1, 0, 0, 4] == 0.0  # nearest CSF label: ventricles
    assert shares[1, 0, 0, 8] == 1.0  # nearest: outer CSF
    assert torch.allclose(shares[:2].sum(0), torch.ones(1, 1, 12))


def test_future_volumes_carry_the_subject_maps_by_the_deformation():
    """A uniform 10 % contraction of the ventricle ball (pull-back expansion) shrinks the carried volume."""
    labels, image = ball_brain(12.0, skull=False)
    own = anatomy.subject_anatomy(torch.from_numpy(image), torch.from_numpy(labels), None, NAMES, (SPACING,) * 3,
                                  reference_image=torch.from_numpy(image))
    n = labels.shape[0]
    centre = (n - 1) / 2
    grid = fields.voxel_coordinates((n, n, n))
    factor = 1.1 ** (1 / 3)  # pull back from a 1.1x larger ball: volumes / 1.1
    disp = (grid - centre) * (factor - 1)
    ratio = own.volumes_ml(disp)["ventricles"] / own.volumes_ml()["ventricles"]
    assert ratio == pytest.approx(1 / 1.1, rel=0.03)


def test_fit_record_measures_the_fit_and_flags_what_the_registration_missed():
    labels, image = ball_brain(10.0, skull=False)
    template = torch.from_numpy(image)
    n = labels.shape[0]
    velocity = torch.zeros((3, n, n, n))
    velocity[0] = 1.5  # 1.5 voxels = 3 mm along x
    displacement = fields.exp(velocity)
    fixed = fields.warp(template, displacement)  # the subject is the template shifted by 3 mm
    brain = torch.from_numpy((labels > 0).astype(np.float32))
    same = {"ventricles": 8.0, "hippocampus": 4.0, "gm": 100.0}
    record = anatomy.fit_record(fixed, template, velocity, displacement, brain, (SPACING,) * 3, same, same)
    assert record.similarity_after > record.similarity_before + 0.2
    assert record.velocity_max_mm == pytest.approx(3.0, rel=1e-4)
    assert record.folded_fraction == 0.0 and not record.beyond_registration
    assert record.log_jacobian_sd < 1e-3
    missed = anatomy.fit_record(fixed, template, velocity, displacement, brain, (SPACING,) * 3,
                                {**same, "ventricles": 5.0}, same)
    assert missed.beyond_registration and "ventricles" in missed.warning()
    assert missed.residual["ventricles"] == pytest.approx(-0.375)
    assert any(line.startswith("WARNING") for line in missed.lines())
    json.dumps(missed.to_json())  # serialisable for the manifest
    # a structure the registration did not match (the subject's ventricle is WM-like here): local flag
    ventricle = torch.from_numpy((labels == 1).astype(np.float32))
    altered = torch.where(fields.warp(ventricle, displacement) > 0.5, torch.full_like(fixed, 0.85), fixed)
    local = anatomy.fit_record(altered, template, velocity, displacement, brain, (SPACING,) * 3, same, same,
                               {"ventricles": fields.warp(ventricle, displacement)})
    assert record.regional_similarity_ratio == {}
    assert local.regional_similarity_ratio["ventricles"] < anatomy.MIN_REGIONAL_SIMILARITY_RATIO
    assert local.beyond_registration and "local similarity" in local.warning()


def test_fit_record_flags_a_structure_too_far_from_the_templates_for_the_registration():
    """A subject whose own hippocampus is below CAPTURE_RATIO_LIMITS' fraction of the template's (outside
    the range validated on phantom subjects, docs/anatomy.md) is flagged; one at 0.9x is not."""
    labels, image = ball_brain(10.0, skull=False)
    template = torch.from_numpy(image)
    n = labels.shape[0]
    zero = torch.zeros((3, n, n, n))
    brain = torch.from_numpy((labels > 0).astype(np.float32))
    low = anatomy.CAPTURE_RATIO_LIMITS["hippocampus"][0]
    tmpl = {"ventricles": 8.0, "hippocampus": 4.0, "amygdala": 1.5, "gm": 100.0}
    typical = {**tmpl, "hippocampus": 0.9 * 4.0}
    record = anatomy.fit_record(template, template, zero, zero, brain, (SPACING,) * 3, typical, typical,
                                template_volumes=tmpl)
    assert record.ratio_to_template["hippocampus"] == pytest.approx(0.9)
    assert not record.beyond_registration
    small = {**tmpl, "hippocampus": (low - 0.05) * 4.0}
    flagged = anatomy.fit_record(template, template, zero, zero, brain, (SPACING,) * 3, small, small,
                                 template_volumes=tmpl)
    assert flagged.beyond_registration and "hippocampus" in flagged.warning() and "template's" in flagged.warning()
    assert flagged.residual["hippocampus"] == 0.0  # the residual alone could not see it
    # without template volumes (older callers) the criterion is skipped
    assert not anatomy.fit_record(template, template, zero, zero, brain, (SPACING,) * 3, small, small).beyond_registration


# ------------------------------------------------------------------------------------------------
# End to end on a 4 mm copy of the default bank (seconds per run)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coarse_bank(tmp_path_factory):
    """The default bank resampled to COARSE_MM (Testing/small_bank.py): the pipeline runs in seconds on it."""
    from small_bank import make_small_bank

    from inbrainsyn.templates import load_bank

    root = make_small_bank(tmp_path_factory.mktemp("bank4mm") / "bank", COARSE_MM)
    return root, load_bank(root)


def _run(image, age, target, cohort, bank_root, out):
    from inbrainsyn.synthesis import SynthesisRequest, run_synthesis

    manifest = run_synthesis(SynthesisRequest(input_path=str(image), age=age, targets=[target], cohort=cohort,
                                              bank=str(bank_root), device="cpu", force_input=True), out)
    volumes = {}
    with open(out / "volumes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            volumes.setdefault(float(row["age"]), {})[row["region"]] = float(row["volume_ml"])
    return volumes, json.loads(manifest.read_text())


@pytest.fixture(scope="module")
def coarse_runs(coarse_bank, tmp_path_factory):
    """A subject with skull, ventricles x2 and hippocampi x0.7, run as HC and as AD."""
    from inbrainsyn.phantom import varied_subject

    root, bank = coarse_bank
    subject = varied_subject(bank, 70.0, ventricle_factor=2.0, hippocampus_factor=0.7, seed=5, skull=True,
                             max_displacement_mm=5.0)
    folder = tmp_path_factory.mktemp("coarse_runs")
    image = folder / "subject.nii.gz"
    sitk.WriteImage(subject.image, str(image))
    runs = {c: _run(image, 70.0, 76.0, c, root, folder / c) for c in ("HC", "AD")}
    return subject, folder, runs, bank


def test_baseline_volumes_do_not_depend_on_the_cohort(coarse_runs):
    _, _, runs, _ = coarse_runs
    hc, ad = runs["HC"][0][70.0], runs["AD"][0][70.0]
    for region in hc:
        assert ad[region] == pytest.approx(hc[region], rel=0.005), region
    # ... while the futures do (AD ages faster)
    assert runs["AD"][0][76.0]["hippocampus"] < runs["HC"][0][76.0]["hippocampus"]


def test_the_ageing_lands_on_the_subjects_true_structures(coarse_runs):
    """Mean atrophy map over the TRUE hippocampus / ventricles ~ the change reported for them.

    On this 4 mm grid the subject's own regions are coarse (ventricles ~ 600 voxels, hippocampus
    ~ 150).  Measured with the registration defaults of the time (sigma 1.0): 13 % / 7 % (hippocampus
    HC / AD) and 33 % / 26 % (ventricles); with the final defaults (sigma 0.35, tuned for the shipped
    1.5 mm grid): 39 % / 59 % (hippocampus) and 11 % / 9 % (ventricles).  So the bound is 40 % for
    the ventricles and 65 % for the hippocampus; both still fail when the volumes are not carried by
    the synthesis deformation (error 100 %) or the atrophy map is inverted (wrong sign, ~200 %).  The
    issue's 10 % target is measured at the bank's 1.5 mm by benchmarks/bench_subject_volumes.py:
    at most 4.6 % on held-out subjects with the final defaults (docs/anatomy.md, docs/registration.md).
    """
    subject, folder, runs, bank = coarse_runs
    tolerance = {"hippocampus": 0.65, "ventricles": 0.40}
    errors = {}
    for cohort in ("HC", "AD"):
        volumes, manifest = runs[cohort]
        jac_path = next(o["path"] for o in manifest["outputs"] if o["kind"] == "jacobian")
        jac = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / cohort / jac_path))).astype(np.float64)
        for region, label in (("hippocampus", "hippocampus"), ("ventricles", "lateral_ventricles")):
            index = [i for i, v in enumerate(subject.values) if bank.label_names[v] == label][0]
            weight = subject.maps[index].numpy().astype(np.float64)
            on_truth = (jac * weight).sum() / weight.sum() - 1.0
            reported = volumes[76.0][region] / volumes[70.0][region] - 1.0
            assert abs(reported) > 0.005
            errors[cohort, region] = abs(on_truth - reported) / abs(reported)
    assert all(e <= tolerance[region] for (_, region), e in errors.items()), errors


def test_every_run_records_the_fit(coarse_runs):
    _, _, runs, _ = coarse_runs
    for cohort in ("HC", "AD"):
        diagnostics = runs[cohort][1]["diagnostics"]
        fit = diagnostics["template_to_subject_fit"]
        assert fit["similarity_after"] > fit["similarity_before"]
        assert fit["folded_fraction"] == 0.0
        assert fit["velocity_max_mm"] > 0 and fit["log_jacobian_sd"] > 0
        assert diagnostics["beyond_registration"] == bool(fit["reasons"])
        assert diagnostics["subject_anatomy"]["reference_cohort"] == "HC"
