"""Evaluation metrics and statistics (analytic cases) and one end-to-end `inbrainsyn evaluate` on a tiny phantom."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from inbrainsyn import evaluate, fields


def test_psnr_mae_of_known_error():
    mask = np.ones((10, 10, 10), bool)
    truth = np.zeros((10, 10, 10))
    pred = truth + 0.1
    assert evaluate.psnr(pred, truth, mask) == pytest.approx(20.0)
    assert np.mean(np.abs(pred - truth)) == pytest.approx(0.1)


def test_ssim_is_one_for_identical_and_lower_for_noisy_images():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (20, 20, 20))
    mask = np.ones_like(image, bool)
    assert evaluate.ssim(image, image, mask) == pytest.approx(1.0)
    assert evaluate.ssim(image + rng.normal(0, 0.2, image.shape), image, mask) < 0.9


def test_mean_dice_counts_each_label_present_in_the_truth():
    truth = np.zeros((10, 10, 10), int)
    truth[:5] = 1
    truth[5:] = 2
    pred = truth.copy()
    pred[:5, :5] = 2  # half of label 1 swapped
    d1 = 2 * 250 / (250 + 500)
    d2 = 2 * 500 / (750 + 500)
    assert evaluate.mean_dice(pred, truth, [1, 2, 3]) == pytest.approx((d1 + d2) / 2)


def test_unit_range_maps_percentiles():
    values = np.linspace(0, 100, 1000).reshape(10, 10, 10)
    mapped = evaluate.unit_range(values, np.ones_like(values, bool))
    assert mapped.min() == 0 and mapped.max() == 1


def test_endpoint_error_of_a_known_offset():
    shape = (6, 7, 8)
    true = np.zeros((*shape, 3))
    pred = true.copy()
    pred[..., 0] = 3.0
    pred[..., 1] = 4.0
    mask = np.zeros(shape, bool)
    mask[1:4] = True
    mean, p95 = evaluate.endpoint_error(pred, true, mask)
    assert mean == pytest.approx(5.0) and p95 == pytest.approx(5.0)


def test_regional_log_changes_of_a_uniform_scaling():
    """Pull-back by x -> c + s (x - c) scales a blob's volume by 1/s^3: log change -3 log s."""
    shape = (40, 40, 40)
    x = fields.voxel_coordinates(shape, dtype=torch.float32)
    r2 = ((x - 19.5) ** 2).sum(0)
    maps = torch.stack([(r2 < 8.0**2).float(), (r2 < 12.0**2).float() - (r2 < 8.0**2).float()])
    s = 0.95
    disp = (s - 1.0) * (x - 19.5)
    changes = evaluate.regional_log_changes(maps, {"inner": [0], "both": [0, 1]}, disp)
    assert changes["inner"] == pytest.approx(-3 * math.log(s), abs=0.01)
    assert changes["both"] == pytest.approx(-3 * math.log(s), abs=0.01)
    assert evaluate.regional_log_changes(maps, {"inner": [0]}, None)["inner"] == 0.0


def _rows(effect: float, noise: float, subjects: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(subjects):
        base = rng.normal(28, 1)
        for k in range(3):
            for method, value in (("copy", base), ("oracle", base + 2.0), ("pole", base + effect + rng.normal(0, noise))):
                rows.append({"subject": f"s{s}", "age": 70 + k, "truth": "subject", "method": method, "psnr": value})
    return rows


def test_paired_difference_interval_covers_the_effect_and_excludes_zero_when_clear():
    p = evaluate.paired_differences(_rows(1.0, 0.3), "pole", "copy", "psnr", "subject", seed=1)
    assert p["lo"] < 1.0 < p["hi"] and p["lo"] > 0
    assert p["n"] == 36 and p["subjects"] == 12
    null = evaluate.paired_differences(_rows(0.0, 0.5), "pole", "copy", "psnr", "subject", seed=1)
    assert null["lo"] < 0 < null["hi"]
    again = evaluate.paired_differences(_rows(1.0, 0.3), "pole", "copy", "psnr", "subject", seed=1)
    assert again == p  # deterministic for a seed


def test_gap_closed_is_the_share_of_the_copy_to_oracle_gap():
    g = evaluate.gap_closed(_rows(1.0, 0.0), "pole", "subject")
    assert g["share"] == pytest.approx(0.5) and g["lo"] == pytest.approx(0.5) and g["hi"] == pytest.approx(0.5)
    g = evaluate.gap_closed(_rows(1.5, 0.3), "pole", "subject")
    assert g["lo"] < 0.75 < g["hi"]


def test_strata_are_distance_tertiles():
    rows = [{"subject": f"s{i}", "distance_mm": float(i)} for i in range(9)]
    names = evaluate.add_strata(rows)
    assert len(names) == 3
    assert [r["stratum"] for r in rows] == [names[0]] * 3 + [names[1]] * 3 + [names[2]] * 3


@pytest.mark.slow
def test_evaluate_end_to_end_on_a_tiny_phantom(tmp_path):
    """One subject (with skull: the whole pipeline), one follow-up, every method, both truths."""
    from inbrainsyn.cli import main

    phantom = tmp_path / "phantom"
    assert main(["phantom", "-o", str(phantom), "--subjects", "1", "--seed", "5", "--spacing", "3", "--followups", "4"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--phantom", str(phantom), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["method"] for r in rows} == set(evaluate.METHODS)
    assert {r["truth"] for r in rows} == {"subject", "pattern"}
    assert {r["input"] for r in rows} == {"head"}
    for row in rows:
        for metric in evaluate.METRICS:
            assert np.isfinite(float(row[metric])), (row["method"], metric)
    get = {(r["truth"], r["method"]): r for r in rows}
    for truth in ("subject", "pattern"):
        oracle, copy, pole = get[(truth, "oracle")], get[(truth, "copy")], get[(truth, "pole")]
        # float32 round trip of the true field: zero up to ~1e-7
        assert float(oracle["epe_mm"]) < 1e-5 and float(oracle["dlv_mean"]) < 1e-5
        assert float(oracle["psnr"]) > float(copy["psnr"])
        # 4 years of ageing: the prediction's volume changes beat "no change"
        assert float(pole["dlv_mean"]) < float(copy["dlv_mean"])
        assert float(copy["dlv_hippocampus"]) == pytest.approx(-float(copy["true_dlv_hippocampus"]))
        # the ceilings: the cohort-rate solve on the true anatomy differs from the truth only by the
        # subject's pace (rate multipliers exp(N(0, 0.2))), so it lies far nearer than any transport
        cohort, conjugated = get[(truth, "oracle-cohort")], get[(truth, "oracle-conjugation")]
        assert 0 < float(cohort["epe_mm"]) < float(pole["epe_mm"])
        assert float(copy["psnr"]) < float(conjugated["psnr"]) < float(oracle["psnr"])
        assert float(cohort["rebuild_s"]) > 0
    assert float(get[("subject", "oracle-cohort")]["dlv_mean"]) < float(get[("subject", "pole")]["dlv_mean"])
    report = (out / "report.md").read_text()
    assert "| pole |" in report and "gap closed" in report and "individual pace" in report
    assert (out / "figure.png").stat().st_size > 0


def test_rebuilt_anatomy_is_the_written_one_and_other_settings_are_refused(tmp_path):
    """The evaluation's ceilings rebuild the phantom subject from its seed: the labels agree exactly;
    a phantom.json whose seed does not match its images is refused rather than scored."""
    import json

    import SimpleITK as sitk

    from inbrainsyn.cli import main
    from inbrainsyn.errors import InputError
    from inbrainsyn.templates import load_bank

    phantom = tmp_path / "phantom"
    assert main(["phantom", "-o", str(phantom), "--subjects", "1", "--seed", "3", "--spacing", "4", "--followups", "2",
                 "--truths", "subject", "--quiet"]) == 0
    bank = load_bank(None)
    settings = evaluate.phantom_settings(phantom)
    image = sitk.ReadImage(str(phantom / "sub-000" / "sub-000_scan-0_labels.nii.gz"))
    labels = sitk.GetArrayFromImage(image)
    grid = fields.Grid.from_sitk(image)
    anatomy, config, mismatch = evaluate.rebuild_anatomy("sub-000", settings, bank, grid, labels)
    assert mismatch == 0.0 and config.seed == 3
    info = json.loads((phantom / "phantom.json").read_text())
    assert anatomy.plan["baseline_age"] == info["subjects"][0]["baseline_age"]
    settings["config"]["seed"] = 4
    with pytest.raises(InputError, match="differs from its written labels"):
        evaluate.rebuild_anatomy("sub-000", settings, bank, grid, labels)


def test_evaluate_on_the_cohort_engine_gives_the_same_rows_as_in_process(tmp_path):
    """--workers 2 maps subjects over a local Dask cluster (inbrainsyn.parallel); the metrics equal
    the in-process run's (every step is deterministic for the seed on one thread)."""
    from inbrainsyn.cli import main

    phantom = tmp_path / "phantom"
    assert main(["phantom", "-o", str(phantom), "--subjects", "2", "--seed", "7", "--spacing", "4", "--followups", "4",
                 "--truths", "subject"]) == 0
    tables = {}
    for workers in ("1", "2"):
        out = tmp_path / f"eval{workers}"
        assert main(["evaluate", "--phantom", str(phantom), "-o", str(out), "--methods", "pole", "copy",
                     "--workers", workers, "--threads", "1", "--quiet"]) == 0
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        tables[workers] = sorted(({k: v for k, v in r.items() if not k.endswith("_s") and k != "seconds"} for r in rows),
                                 key=lambda r: (r["subject"], r["age"], r["method"], r["truth"]))
    assert len(tables["1"]) == 4 and tables["1"] == tables["2"]


def test_conjugate_by_map_of_an_affine_map_is_the_pulled_back_field():
    """phi(x) = A (x - c) + c + t: phi^-1 o E o phi has displacement A^-1 e(phi(x)) (analytic)."""
    shape = (24, 26, 28)
    x = fields.voxel_coordinates(shape, dtype=torch.float64)
    c = torch.tensor([13.5, 12.5, 11.5], dtype=torch.float64).view(3, 1, 1, 1)
    a = torch.tensor([[1.08, 0.05, 0.0], [-0.04, 0.95, 0.03], [0.02, 0.0, 1.02]], dtype=torch.float64)
    t = torch.tensor([0.7, -0.4, 0.3], dtype=torch.float64).view(3, 1, 1, 1)

    def affine(p):
        return torch.einsum("ij,j...->i...", a, p - c) + c + t

    def ageing(p):  # a smooth displacement (voxels), analytic so it can be evaluated anywhere
        return torch.stack([0.6 * torch.sin(2 * math.pi * p[1] / 20), 0.4 * torch.cos(2 * math.pi * p[2] / 18),
                            0.5 * torch.sin(2 * math.pi * p[0] / 22)])

    phi = (affine(x) - x).float()
    moved, residual = evaluate.conjugate_by_map(ageing(x).float(), phi)
    expected = torch.einsum("ij,j...->i...", torch.linalg.inv(a), ageing(affine(x)))
    inside = (slice(None), slice(5, -5), slice(5, -5), slice(5, -5))  # where phi(x) stays on the grid
    assert float((moved - expected.float())[inside].abs().max()) < 0.03  # trilinear sampling of a smooth field
    assert residual < 1.0  # the border (phi leaves the grid) converges less well; the inside is checked above
