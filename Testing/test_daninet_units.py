"""DaniNet slice mode: conditioning, geometry, losses, regressors, networks, a training step (tiny config)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import geometry, losses, train
from inbrainsyn.daninet.model import DaniNet, DaniNetConfig
from inbrainsyn.daninet.regressors import RegionRegressors
from inbrainsyn.errors import InputError

TINY = dict(frame_size=32, enc_channels=(4, 8, 8, 16, 16), gen_channels=(16, 16, 8, 8, 4),
            disc_channels=(4, 8, 8, 8), z_dim=16, disc_fc=16, slice_band=(10, 20))


def tiny_model(seed: int = 0) -> DaniNet:
    torch.manual_seed(seed)
    return DaniNet(DaniNetConfig(**TINY))


# -- conditioning ---------------------------------------------------------------------------------

def test_age_bins_cover_55_to_95_in_ten_4_year_bins():
    assert cond.N_AGE_BINS == 10
    assert cond.age_bin(55.0) == 0 and cond.age_bin(58.99) == 0 and cond.age_bin(59.0) == 1
    assert cond.age_bin(94.9) == 9 and cond.age_bin(40.0) == 0 and cond.age_bin(120.0) == 9
    np.testing.assert_allclose(cond.AGE_CENTRES, np.arange(57, 95, 4))


def test_age_membership_is_a_distribution_peaking_at_the_nearest_centre():
    m = cond.age_membership(np.array([57.0, 70.0, 93.0]))
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    assert list(m.argmax(axis=1)) == [0, 3, 9]  # 70 is nearest 69 (bin 3)
    # sigma 2.5 y: a neighbour bin 4 y away weighs exp(-16/12.5) of the centre bin
    m57 = m[0]
    assert m57[1] / m57[0] == pytest.approx(np.exp(-16 / 12.5), rel=1e-9)


def test_diagnosis_mapping_hc_to_cn_and_ad_to_ad():
    assert cond.diagnosis_class("HC") == 0 and cond.diagnosis_class("cn") == 0
    assert cond.diagnosis_class("AD") == 3
    assert cond.diagnosis_class("HC->AD") == 2 and cond.diagnosis_class("MCI") == 2
    with pytest.raises(InputError, match="unknown cohort"):
        cond.diagnosis_class("FTD")


def test_slice_code_is_smooth_and_normalised():
    code = cond.slice_code(torch.tensor([10, 11, 20]), (10, 20), 5)
    torch.testing.assert_close(code.sum(dim=1), torch.ones(3))
    assert code[0].argmax() == 0 and code[2].argmax() == 4
    # neighbouring slices get close codes, the ends of the band distant ones
    assert (code[0] - code[1]).abs().sum() < 0.5 * (code[0] - code[2]).abs().sum()


# -- geometry -------------------------------------------------------------------------------------

def test_frame_round_trip_keeps_a_smooth_slice_and_its_shape():
    yy, xx = np.mgrid[0:70, 0:50]
    sl = (0.5 + 0.4 * np.sin(yy / 9.0) * np.cos(xx / 7.0)).astype(np.float32)
    frame = geometry.to_frame(sl[None], 128)
    assert frame.shape == (1, 1, 128, 128) and frame.min() >= -1 and frame.max() <= 1
    back = geometry.from_frame(frame, sl.shape)[0]
    assert back.shape == sl.shape
    # bilinear up- then down-sampling of a smooth image: interior error well below the 0.8 range
    assert np.abs(back - sl)[5:-5, 5:-5].max() < 0.02


def test_normalise_intensity_keeps_unit_range_and_scales_scanner_units():
    v = np.random.default_rng(0).uniform(0, 1, (4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(geometry.normalise_intensity(v), v)
    scaled = geometry.normalise_intensity(v * 900.0)
    assert scaled.max() == pytest.approx(1.0) and np.percentile(scaled[scaled > 0], 50) < 0.7


@pytest.mark.parametrize("bad, message", [(np.zeros((5, 6)), "3D volume"), (np.zeros((2, 3, 4, 5)), "3D volume"),
                                          (np.full((3, 4, 5), np.nan), "NaN")])
def test_volume_checks(bad, message):
    with pytest.raises(InputError, match=message):
        geometry.as_volume_array(bad)


def test_slice_index_checks():
    assert geometry.check_slice_index(12, 30, (10, 20)) == 12
    with pytest.raises(InputError, match="outside the volume"):
        geometry.check_slice_index(30, 30)
    with pytest.raises(InputError, match="band the DaniNet model was trained on"):
        geometry.check_slice_index(25, 30, (10, 20))
    with pytest.raises(InputError, match="integer"):
        geometry.check_slice_index(12.5, 30)


# -- losses ---------------------------------------------------------------------------------------

def test_l_vox_is_zero_for_outputs_darkening_forward_and_positive_otherwise():
    x = torch.zeros(1, 1, 8, 8)
    bins = torch.tensor([[1, 2, 3, 4, 5]])
    true_bin = torch.tensor([3])
    # earliest bin brighter, the darkest past bin and the true bin = x, future darker:
    # voxels only darken forward in time (the literal code formula: max future = x = min past)
    good = torch.stack([x[0] + 0.2, x[0], x[0], x[0] - 0.1, x[0] - 0.3])[None]
    assert losses.loss_vox(good, x, bins, true_bin).item() == pytest.approx(0.0, abs=1e-7)
    bad = good.clone()
    bad[0, 4] = 0.4  # a future bin brighter than x: max over future = 0.4 -> 0.4 / 2
    assert losses.loss_vox(bad, x, bins, true_bin).item() == pytest.approx(0.2, abs=1e-6)
    bad = good.clone()
    bad[0, 0] = -0.3  # a past bin darker than x: min over past = -0.3 -> 0.3 / 2
    assert losses.loss_vox(bad, x, bins, true_bin).item() == pytest.approx(0.15, abs=1e-6)
    # no past bin in the subset: only the future term counts
    assert losses.loss_vox(good[:, 2:], x, bins[:, 2:], true_bin).item() == pytest.approx(0.0, abs=1e-7)


def test_l_def_weights_follow_the_age_membership():
    age = torch.tensor([69.0])
    bins = torch.tensor([[2, 3, 4, 8]])
    w = losses.def_weights(age, bins)[0]
    assert w.argmax() == 1  # bin 3 (centre 69)
    assert w[3] == pytest.approx(losses.L_DEF_FLOOR, abs=1e-6)  # 20 y away: only the floor
    g = torch.zeros(1, 4, 1, 4, 4)
    x = torch.ones(1, 1, 4, 4)
    assert losses.loss_def(g, x, w[None]).item() == pytest.approx(float(w.sum()), rel=1e-6)


def test_regressors_recover_a_known_regional_intensity_decline():
    """Scans darken by 2% per year in every region: the fitted ratio for 10 y is 0.8."""
    rng = np.random.default_rng(0)
    frames, subj, age, dx, ks = [], [], [], [], []
    for s in range(6):
        base = torch.rand(1, 1, 32, 32) * 0.5 + 0.3
        a0 = rng.uniform(60, 80)
        for dt in (0, 2, 4):
            frames.append((base * (1 - 0.02 * dt)) * 2 - 1)
            subj.append(s); age.append(a0 + dt); dx.append(0); ks.append(12)
    regs = RegionRegressors.fit(torch.cat(frames), np.array(subj), np.array(age), np.array(dx), np.array(ks), grid=4)
    pred = regs.predict_ratio(np.array([70.0]), np.array([80.0]), np.array([0]), np.array([12]))
    np.testing.assert_allclose(pred, 0.8, atol=0.01)
    same = regs.predict_ratio(np.array([70.0]), np.array([70.0]), np.array([3]), np.array([12]))
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    back = RegionRegressors.from_state(regs.to_state())
    np.testing.assert_allclose(back.coef, regs.coef)


# -- networks -------------------------------------------------------------------------------------

def test_network_shapes():
    m = tiny_model()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    z = m.E(x)
    assert z.shape == (3, 16) and z.abs().max() < 1
    dx, k = torch.tensor([0, 3, 2]), torch.tensor([10, 15, 20])
    g = m.generate_all_bins(z, dx, k)
    assert g.shape == (3, cond.N_AGE_BINS, 1, 32, 32) and g.abs().max() <= 1
    lab = m.labels(torch.tensor([0, 4, 9]), dx, k)
    assert m.Db(x, lab).shape == (3,) and m.Dz(z).shape == (3,)


def test_full_size_default_network_shapes():
    m = DaniNet(DaniNetConfig(slice_band=(40, 80)))
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    z = m.E(x)
    g = m.G(z, m.labels(torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([40, 80])))
    assert z.shape == (2, m.cfg.z_dim) and g.shape == (2, 1, 128, 128)


def _fixed_batch():
    torch.manual_seed(1)
    x = (torch.rand(4, 1, 32, 32) * 0.6 + 0.2) * 2 - 1
    return x, torch.tensor([62.0, 70.0, 75.0, 88.0]), torch.tensor([0, 3, 0, 3]), torch.tensor([10, 12, 15, 20])


def test_one_training_step_lowers_the_loss_on_a_tiny_batch():
    m = tiny_model()
    x, age, dx, k = batch = _fixed_batch()
    cfg = train.TrainConfig(lr=1e-3, bins_per_sample=4)
    bins = torch.as_tensor(train.choose_bins(np.array([cond.age_bin(a) for a in age.tolist()]), 4, np.random.default_rng(5)))

    def objective() -> float:
        m.train()
        with torch.no_grad():
            return float(train.eg_losses(m, x, age, dx, k, bins, None, np.random.default_rng(0), cfg.weights)["eg_total"])

    before = objective()
    opts = train.make_optimisers(m, cfg)
    # the step draws its own bins; the objective above uses fixed ones: the descent must generalise
    train.train_step(m, opts, batch, cfg, None, np.random.default_rng(5), update_discriminators=False)
    after = objective()
    assert after < before


def test_save_and_load_round_trip(tmp_path):
    m = tiny_model().eval()
    m.meta = {"grid_size_zyx": [30, 40, 50]}
    path = tmp_path / "w.pt"
    m.save(path)
    back = DaniNet.load(path)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.E(x), m.E(x))
    assert back.meta["grid_size_zyx"] == [30, 40, 50]


def test_loading_missing_or_bad_weights_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        DaniNet.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    with pytest.raises(InputError, match="cannot read"):
        DaniNet.load(bad)


def test_choose_bins_keeps_the_true_bin_and_its_neighbours():
    rng = np.random.default_rng(0)
    out = train.choose_bins(np.array([0, 5, 9]), 4, rng)
    assert out.shape == (3, 4)
    assert {0, 1} <= set(out[0]) and {4, 5, 6} <= set(out[1]) and {8, 9} <= set(out[2])
    assert all(len(set(r)) == 4 for r in out)


def test_flow_evaluation_summary_pairs_methods_by_follow_up():
    """Paired differences are taken per follow-up and averaged; the ventricle summary compares the
    predicted with the true area change (copy predicts none)."""
    from inbrainsyn.daninet.flow_evaluate import markdown, summary

    rows = []
    for s, (gain, vent) in enumerate([(0.5, 100.0), (0.7, 200.0), (0.3, 50.0), (0.6, 120.0)]):
        for t, scale in ((72.0, 1.0), (74.0, 2.0)):
            base = {"subject": f"s{s}", "group": "HC", "age_from": 70.0, "age": t, "truth": "subject",
                    "slices": 10, "ssim": 0.9, "mae": 0.02, "vent_true_mm2": vent * scale}
            rows.append({**base, "method": "copy", "psnr": 30.0, "vent_pred_mm2": 0.0})
            rows.append({**base, "method": "copy-blur", "psnr": 30.2, "vent_pred_mm2": 0.0})
            rows.append({**base, "method": "daninet", "psnr": 30.0 + gain, "vent_pred_mm2": 0.5 * vent * scale})
    out = summary(rows)
    psnr = next(d for d in out["paired"] if d["method"] == "daninet" and d["reference"] == "copy" and d["metric"] == "psnr")
    assert psnr["mean"] == pytest.approx(0.525) and 0.3 <= psnr["lo"] <= psnr["mean"] <= psnr["hi"] <= 0.7
    assert psnr["subjects"] == 4 and psnr["n"] == 8
    blur = next(d for d in out["paired"] if d["reference"] == "copy-blur" and d["metric"] == "psnr")
    assert blur["mean"] == pytest.approx(0.325)
    assert out["ventricles"]["ratio_pred_true"] == pytest.approx(0.5)
    assert out["ventricles"]["same_sign_fraction"] == 1.0
    assert "| daninet - copy, psnr | +0.5250 |" in markdown(out)


# ---------------------------------------------------------------- the preview's PNG strip


def test_diverging_map_ends_centre_and_clipping():
    from inbrainsyn.daninet.strip import DIVERGING_ANCHORS, diverging_rgb

    rgb = diverging_rgb(np.array([[-0.2, 0.0, 0.2, 5.0, -5.0]]), 0.2)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 5, 3)
    assert rgb[0, 0].tolist() == DIVERGING_ANCHORS[0].tolist()  # loss -> blue end
    assert rgb[0, 1].tolist() == DIVERGING_ANCHORS[3].tolist()  # no change -> near white
    assert rgb[0, 2].tolist() == DIVERGING_ANCHORS[-1].tolist()  # gain -> red end
    assert rgb[0, 3].tolist() == rgb[0, 2].tolist() and rgb[0, 4].tolist() == rgb[0, 0].tolist()


def test_strip_layout_grey_levels_and_first_row_at_the_bottom(tmp_path):
    """A 40 x 20 slice (rows x columns), dark except a bright first row, and one prediction that
    darkens everything by 0.25: the baseline panel is grey 0.5 (128) with its bright row at the
    bottom, the change panel is the blue end of the map (the change equals the colour scale)."""
    from PIL import Image

    from inbrainsyn.daninet import strip

    x = np.full((40, 20), 0.5, dtype=np.float32)
    x[0] = 1.0
    path = tmp_path / "strip.png"
    strip.write_strip_png(x, [x - 0.25], ["baseline 70.0 y", "75.0 y"], "title", path)
    image = np.asarray(Image.open(path).convert("RGB"))
    h, w = strip.PANEL, strip.PANEL // 2  # longer side (rows) scaled to PANEL
    top = 2 * strip.LABEL_HEIGHT
    assert image.shape[1] == strip.MARGIN + 2 * (w + strip.MARGIN)
    panel = image[top:top + h, strip.MARGIN:strip.MARGIN + w]
    assert np.abs(panel[h // 2].astype(int) - 128).max() <= 1
    assert panel[-1].min() >= 250 and panel[0].max() <= 130  # first row shown at the bottom
    change = image[top + h + strip.LABEL_HEIGHT: top + 2 * h + strip.LABEL_HEIGHT, 2 * strip.MARGIN + w: 2 * strip.MARGIN + 2 * w]
    assert np.abs(change[h // 2, w // 2].astype(int) - strip.DIVERGING_ANCHORS[0]).max() <= 1


def test_brain_weight_is_one_inside_and_falls_to_zero_beyond_the_margin():
    """A half-plane mask (columns < 10) on 1.5 x 2 mm pixels: the weight depends on the column's
    distance d = 2 (c - 9) mm from the mask: 1 up to the margin, linear to 0 over the ramp."""
    mask = np.zeros((5, 20), dtype=np.uint8)
    mask[:, :10] = 1
    w = geometry.brain_weight(mask, (1.5, 2.0), margin_mm=2.0, ramp_mm=4.0)
    expected = np.clip((2.0 + 4.0 - 2.0 * np.maximum(np.arange(20) - 9, 0)) / 4.0, 0, 1)
    assert np.allclose(w, expected[None, :].repeat(5, axis=0), atol=1e-6)
    assert not geometry.brain_weight(np.zeros((4, 4)), (1.0, 1.0)).any()
