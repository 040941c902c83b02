"""DaniNet slice mode with the shipped (slice-ageing) model: coverage, behaviour, preview, CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry
from inbrainsyn.daninet.preview import default_weights_path, is_flow, load_model, preview_slices
from inbrainsyn.errors import InputError


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def template_volume(model):
    """The shipped bank's HC template at 75 y: a real brain on the model's template grid."""
    from inbrainsyn.templates import load_bank

    image = load_bank(None).template("HC", 75.0)  # a listed age: no interpolation
    assert tuple(reversed(image.GetSize())) == tuple(model.meta["grid_size_zyx"])
    return image


def mid_slice(model) -> int:
    lo, hi = model.cfg.slice_band
    return (lo + hi) // 2


def brain_frame(model, volume: sitk.Image, k: int) -> tuple[torch.Tensor, np.ndarray]:
    vol = geometry.normalise_intensity(sitk.GetArrayFromImage(volume))
    frame = geometry.to_frame(vol[k][None], model.cfg.frame_size)
    return frame, (frame[0, 0] > -0.8).numpy()  # brain (intensity > 0.1 of the [0, 1] range)


def test_shipped_weights_load_and_fit_the_size_budget(model):
    from inbrainsyn.daninet.flow_train import brain_band
    from inbrainsyn.templates import load_bank

    path = default_weights_path()
    resources = path.parent.parent
    total = sum(p.stat().st_size for p in resources.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024, f"Resources/ holds {total / 2**20:.1f} MB > 30 MB"
    assert (path.parent / "MODEL_CARD.md").is_file()
    assert is_flow(model) and model.meta["grid_size_zyx"]
    # coverage: every template slice with >= 20 % brain (of the slice's area and of the largest slice's)
    mask = sitk.GetArrayFromImage(load_bank(None).mask) > 0.5
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    needed = np.flatnonzero((area >= 0.2 * mask[0].size) | (area >= 0.2 * area.max()))
    lo, hi = model.cfg.slice_band
    assert (lo, hi) == brain_band(load_bank(None).mask)
    assert lo <= needed.min() and needed.max() <= hi, (lo, hi, needed.min(), needed.max())


def test_zero_interval_is_the_copy_and_the_change_grows_with_the_interval(model, template_volume):
    k = mid_slice(model)
    out = preview_slices(template_volume, k, 72.0, "AD", [72.0, 76.0, 80.0])
    base = out["baseline"]
    assert base.shape == template_volume.GetSize()[1::-1]
    assert np.array_equal(out["predictions"][0], base)  # y(a0) = x bit for bit
    changes = [float(np.abs(p - base).mean()) for p in out["predictions"]]
    # 1e-4 of the range on average is far above float noise, far below the trained change
    assert changes[1] > 1e-4 and changes[2] > 1.3 * changes[1], changes


def _ventricle_area_change(model, volume, k, cohort, age, target):
    """Lateral-ventricle pixels of template slice k moved by the model's displacement (target - age)."""
    from inbrainsyn.daninet.preview import flow_apply, flow_rates_on_slice
    from inbrainsyn.templates import load_bank

    bank = load_bank(None)
    labels = sitk.GetArrayFromImage(bank.labels_at(cohort, age))
    vent = (labels[k] == 1).astype(np.float32)
    vol = geometry.normalise_intensity(sitk.GetArrayFromImage(volume))
    frame = geometry.to_frame(vol[k][None], model.cfg.frame_size)
    u, r = flow_rates_on_slice(model, frame, vol[k].shape, age, cond.diagnosis_class(cohort), k)
    warped = flow_apply(vent, u, torch.zeros_like(r), target - age)
    return float((warped > 0.5).sum() - (vent > 0.5).sum()), float(vent.sum())


def test_ventricles_grow_forward_in_time_and_faster_in_ad(model, template_volume):
    """The phantom's (and the bank's) ventricles enlarge with age, more in AD: on the template's
    ventricle slices, the predicted displacement must grow the ventricle area for a future age."""
    from inbrainsyn.templates import load_bank

    labels = sitk.GetArrayFromImage(load_bank(None).labels)
    area = (labels == 1).reshape(labels.shape[0], -1).sum(axis=1)
    ks = [int(k) for k in np.argsort(area)[-3:]]  # the three slices with the largest ventricles
    hc = sum(_ventricle_area_change(model, template_volume, k, "HC", 75.0, 85.0)[0] for k in ks)
    ad = sum(_ventricle_area_change(model, template_volume, k, "AD", 75.0, 85.0)[0] for k in ks)
    assert hc > 0 and ad > hc, (hc, ad)


def test_preview_accepts_an_array_in_scanner_units(model, template_volume):
    k = mid_slice(model)
    arr = sitk.GetArrayFromImage(template_volume) * 1000.0
    a = preview_slices(arr, k, 70.0, "HC", [80])
    b = preview_slices(template_volume, k, 70.0, "HC", [80])
    # same brain, different units: the normalisation makes them agree
    assert np.abs(a["baseline"] - b["baseline"]).mean() < 0.05


def test_test_time_transfer_is_refused_for_the_shipped_model(model, template_volume):
    with pytest.raises(InputError, match="adversarial DaniNet only"):
        preview_slices(template_volume, mid_slice(model), 70.0, "HC", [80], finetune_steps=1)


@pytest.mark.parametrize("volume, message", [
    (np.zeros((40, 50)), "3D volume"),
    (np.zeros((2, 40, 50, 60)), "3D volume"),
    (np.zeros((30, 40, 50)), "not the template grid"),
])
def test_preview_rejects_bad_volumes(volume, message):
    with pytest.raises(InputError, match=message):
        preview_slices(volume, 40, 70.0, "HC", [80])


def test_preview_rejects_bad_slice_age_cohort_and_weights(model, template_volume, tmp_path):
    lo, hi = model.cfg.slice_band
    with pytest.raises(InputError, match="band the DaniNet model was trained on"):
        preview_slices(template_volume, hi + 1, 70.0, "HC", [80])
    with pytest.raises(InputError, match="outside the volume"):
        preview_slices(template_volume, 10_000, 70.0, "HC", [80])
    with pytest.raises(InputError, match="target age"):
        preview_slices(template_volume, lo, 70.0, "HC", [140])
    with pytest.raises(InputError, match="unknown cohort"):
        preview_slices(template_volume, lo, 70.0, "XYZ", [80])
    with pytest.raises(InputError, match="weights not found"):
        preview_slices(template_volume, lo, 70.0, "HC", [80], weights=tmp_path / "none.pt")


def test_cli_preview_writes_slices_strip_and_manifest(model, template_volume, tmp_path):
    from inbrainsyn.cli import main

    src = tmp_path / "subject.nii.gz"
    sitk.WriteImage(template_volume, str(src))
    out = tmp_path / "preview"
    k = mid_slice(model)
    rc = main(["daninet", "preview", str(src), "--age", "70", "--cohort", "HC", "--targets", "75", "85",
               "--slice", str(k), "-o", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "daninet preview" and manifest["inputs"]["slice"] == k
    kinds = [o["kind"] for o in manifest["outputs"]]
    assert kinds == ["baseline", "synthetic", "synthetic", "report"]
    for o in manifest["outputs"]:
        assert (out / o["path"]).is_file()
    img = sitk.ReadImage(str(out / manifest["outputs"][1]["path"]))
    assert img.GetSize() == template_volume.GetSize()[:2]
    assert img.GetSpacing() == pytest.approx(template_volume.GetSpacing()[:2])
    # an existing output is refused without --overwrite
    assert main(["daninet", "preview", str(src), "--age", "70", "--cohort", "HC", "--targets", "75",
                 "--slice", str(k), "-o", str(out)]) != 0


def test_shipped_model_records_the_bank_template_grid(model):
    """A preview with a reused alignment takes the template grid from the weights, not the bank: the
    recorded geometry must be the shipped bank's grid (else slices would land in the wrong place)."""
    from inbrainsyn.daninet.preview import template_grid
    from inbrainsyn.templates import load_bank

    recorded, mask = template_grid(model), load_bank(None).mask
    assert recorded is not None
    assert recorded.GetSize() == mask.GetSize()
    assert recorded.GetSpacing() == pytest.approx(mask.GetSpacing(), abs=1e-6)
    assert recorded.GetOrigin() == pytest.approx(mask.GetOrigin(), abs=1e-6)
    assert recorded.GetDirection() == pytest.approx(mask.GetDirection(), abs=1e-9)


def test_weights_without_a_recorded_grid_fall_back_to_the_bank(model):
    from inbrainsyn.daninet.preview import template_grid

    class Bare:
        meta = {"grid_size_zyx": model.meta["grid_size_zyx"]}

    assert template_grid(Bare()) is None


def test_preview_keeps_the_baseline_outside_the_template_brain(model, template_volume):
    """With the template's brain mask the slice-ageing change stays within the margin of the brain:
    a bright 'scalp' ring painted 6-9 mm outside the mask is returned unchanged at 85 y, while the
    brain itself changes; without the mask the model changes the ring."""
    from scipy import ndimage

    from inbrainsyn.daninet.preview import template_brain_mask

    mask = template_brain_mask()
    k = mid_slice(model)
    vol = geometry.normalise_intensity(sitk.GetArrayFromImage(template_volume))
    outside = ndimage.distance_transform_edt(sitk.GetArrayViewFromImage(mask)[k] == 0, sampling=(1.5, 1.5))
    ring = (outside > 6.0) & (outside < 9.0)
    vol[k][ring] = 0.8
    image = sitk.GetImageFromArray(vol)
    image.CopyInformation(template_volume)
    kept = preview_slices(image, k, 70.0, "AD", [85.0], model=model, brain_mask=mask)
    free = preview_slices(image, k, 70.0, "AD", [85.0], model=model)
    x = kept["baseline"]
    assert np.array_equal(kept["predictions"][0][ring], x[ring])
    assert np.abs(free["predictions"][0][ring] - x[ring]).max() > 0.05  # the ring would be "aged"
    brain = sitk.GetArrayViewFromImage(mask)[k] > 0
    assert np.abs(kept["predictions"][0][brain] - x[brain]).max() > 0.05
