"""DaniNet slice mode with the shipped model: loading, behaviour, preview, CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry
from inbrainsyn.daninet.preview import bin_outputs, default_weights_path, load_model, preview_slices
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
    path = default_weights_path()
    total = sum(p.stat().st_size for p in path.parent.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"Resources/daninet holds {total / 2**20:.1f} MB > 20 MB"
    assert (path.parent / "MODEL_CARD.md").is_file()
    assert model.regressors is not None and model.meta["grid_size_zyx"]
    lo, hi = model.cfg.slice_band
    assert 0 <= lo < hi < model.meta["grid_size_zyx"][0]


def test_a_different_age_or_diagnosis_changes_the_output(model, template_volume):
    k = mid_slice(model)
    frame, brain = brain_frame(model, template_volume, k)
    g_hc = bin_outputs(model, frame, 0, k)[:, 0]
    g_ad = bin_outputs(model, frame, 3, k)[:, 0]
    # age: youngest vs oldest bin; diagnosis: CN vs AD at the oldest bin. A change of 0.01 in [-1, 1]
    # units (0.5% of the range) on average over the brain is far above float noise (1e-6).
    assert (g_hc[0] - g_hc[-1]).abs()[brain].mean() > 0.01
    assert (g_hc[-1] - g_ad[-1]).abs()[brain].mean() > 0.005


def test_shipped_model_darkens_with_age(model, template_volume):
    """L_vox asks voxels to only darken forward in time. Over the age bins the training data
    cover (L_vox and L_def only constrain those), the brain's mean intensity must fall from bin
    to bin, and few brain voxels may brighten between the first and last covered bins."""
    lo_age, hi_age = model.meta["age_range"]
    first, last = cond.age_bin(lo_age), cond.age_bin(hi_age)
    assert last - first >= 3, "the shipped model should cover at least 4 age bins"
    for k in (model.cfg.slice_band[0] + 3, mid_slice(model), model.cfg.slice_band[1] - 3):
        frame, brain = brain_frame(model, template_volume, k)
        for dx in (0, 3):
            g = bin_outputs(model, frame, dx, k)[first:last + 1, 0]
            means = np.array([float(gb[brain].mean()) for gb in g])
            assert np.all(np.diff(means) <= 1e-4), f"slice {k}, class {dx}: brain mean not decreasing {means}"
            # 0.02 in [-1, 1] units = 1% of the intensity range: above the generator's texture noise
            brighter = float(((g[-1] - g[0]) > 0.02)[brain].float().mean())
            assert brighter < 0.10, f"slice {k}, class {dx}: {brighter:.1%} of brain pixels brighten with age"


def test_preview_slices_predicts_each_target_on_the_slice_grid(model, template_volume):
    k = mid_slice(model)
    out = preview_slices(template_volume, k, 70.0, "AD", [75, 80, 85])
    base = out["baseline"]
    assert base.shape == template_volume.GetSize()[1::-1]
    assert len(out["predictions"]) == 3 and all(p.shape == base.shape for p in out["predictions"])
    assert out["bins"].shape == (cond.N_AGE_BINS, *base.shape)
    # residual assembly: future ages only darken; the change grows with the gap
    changes = [float(np.abs(p - base).sum()) for p in out["predictions"]]
    assert all(np.all(p <= base + 1e-6) for p in out["predictions"])
    assert changes[0] > 0 and changes[0] <= changes[1] <= changes[2]
    blend = preview_slices(template_volume, k, 70.0, "AD", [80], assembly="blend")
    assert np.all(blend["predictions"][0] <= blend["baseline"] + 1e-6)


def test_preview_accepts_an_array_in_scanner_units(model, template_volume):
    k = mid_slice(model)
    arr = sitk.GetArrayFromImage(template_volume) * 1000.0
    a = preview_slices(arr, k, 70.0, "HC", [80])
    b = preview_slices(template_volume, k, 70.0, "HC", [80])
    # same brain, different units: the normalisation makes them agree
    assert np.abs(a["baseline"] - b["baseline"]).mean() < 0.05


def test_test_time_transfer_fine_tunes_a_copy(model, template_volume):
    k = mid_slice(model)
    before = {n: p.clone() for n, p in model.G.named_parameters()}
    out = preview_slices(template_volume, k, 70.0, "HC", [80], finetune_steps=1)
    assert out["finetune_steps"] == 1 and out["predictions"][0].shape == out["baseline"].shape
    for n, p in model.G.named_parameters():  # the cached shipped model is untouched
        torch.testing.assert_close(p, before[n])


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
