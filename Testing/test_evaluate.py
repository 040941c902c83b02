"""Evaluation metrics (analytic cases) and one end-to-end `inbrainsyn evaluate` on a tiny phantom."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from inbrainsyn import evaluate


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


@pytest.mark.slow
def test_evaluate_end_to_end_on_a_tiny_phantom(tmp_path):
    """One subject, one follow-up, every method: all metrics finite, the table written."""
    from inbrainsyn.cli import main

    phantom = tmp_path / "phantom"
    assert main(["phantom", "-o", str(phantom), "--subjects", "1", "--seed", "5", "--spacing", "3", "--followups", "4"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--phantom", str(phantom), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["method"] for r in rows} == set(evaluate.METHODS)
    for row in rows:
        for metric in evaluate.METRICS:
            assert np.isfinite(float(row[metric]))
    copy = next(r for r in rows if r["method"] == "copy")
    pole = next(r for r in rows if r["method"] == "pole")
    # the follow-up differs from the baseline by 4 years of ageing: predicting it must beat copying
    assert float(pole["mae"]) < float(copy["mae"])
    assert "| pole |" in (out / "table.md").read_text()
    assert (out / "metrics.png").stat().st_size > 0
