"""DaniNet training CLI end to end on a tiny synthetic longitudinal cohort (tiny network)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from inbrainsyn.cli import main


def write_cohort(folder, subjects: int = 4) -> str:
    """Blobs whose 'ventricle' grows and whose tissue darkens with age: 4 scans per subject."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 40, 36)], indexing="ij")
    rows = []
    for s in range(subjects):
        group = "AD" if s % 2 else "HC"
        a0 = float(rng.uniform(62, 78))
        scale = rng.uniform(0.9, 1.1)
        for v, dt in enumerate((0, 2, 4, 6)):
            r2 = (x / scale) ** 2 + y**2 + z**2
            vent = 0.08 + 0.004 * dt * (3 if group == "AD" else 1)
            img = np.where(r2 < 0.8, 800.0 * (1 - 0.01 * dt), 0.0) * (r2 > vent)
            img = img + rng.normal(0, 5, img.shape)
            name = f"s{s}_v{v}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(img.astype(np.float32)), str(folder / name))
            rows.append({"subject": f"s{s}", "scan": v, "age": a0 + dt, "group": group, "path": name})
    path = folder / "cohort.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.mark.slow
def test_train_resume_and_evaluate_tiny(tmp_path):
    cohort = write_cohort(tmp_path)
    out = tmp_path / "run"
    common = ["daninet", "train", "--model", "daninet", "--data", cohort, "-o", str(out), "--tiny", "--slice-band", "8", "16",
              "--slice-stride", "2", "--holdout", "1", "--batch-size", "8"]
    assert main(common + ["--epochs", "1"]) == 0
    for name in ("daninet.pt", "checkpoint.pt", "history.csv", "loss_curves.png", "split.json"):
        assert (out / name).is_file(), name
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [int(h["epoch"]) for h in history] == [1, 2]  # resumed, not restarted
    split = json.loads((out / "split.json").read_text())
    assert len(split["heldout"]) == 1 and split["heldout"][0] not in split["train"]

    ev = tmp_path / "eval"
    assert main(["daninet", "evaluate", "--data", cohort, "--weights", str(out / "daninet.pt"),
                 "--split", str(out / "split.json"), "-o", str(ev)]) == 0
    rows = list(csv.DictReader(open(ev / "metrics.csv")))
    assert {r["method"] for r in rows} == {"daninet", "daninet-blend", "copy"}
    assert len(rows) == 3 * 3  # 3 follow-ups x 3 methods
    for r in rows:
        assert 0 < float(r["ssim"]) <= 1 and float(r["mae"]) >= 0
    assert "| daninet |" in (ev / "table.md").read_text()


def test_flow_train_resume_and_reload_tiny(tmp_path):
    """The slice-ageing model: trains, checkpoints, resumes where it stopped, and the saved model
    (fp16 on disk) still returns the slice unchanged for a zero interval."""
    import torch

    from inbrainsyn.daninet import geometry
    from inbrainsyn.daninet.preview import flow_predictions, is_flow, load_model

    cohort = write_cohort(tmp_path, subjects=3)
    out = tmp_path / "flow"
    # the blobs lie at physical z 0 .. 23 mm: template slices 48 .. 63 of the 1.5 mm grid (origin z -72 mm)
    common = ["daninet", "train", "--data", cohort, "-o", str(out), "--tiny", "--identity-alignment",
              "--slice-band", "50", "60", "--holdout", "1", "--batch-size", "4", "--lr", "1e-3"]
    assert main(common + ["--steps", "50"]) == 0
    for name in ("daninet.pt", "checkpoint.pt", "history.csv", "frames.pt", "split.json"):
        assert (out / name).is_file(), name
    assert main(common + ["--steps", "100", "--resume"]) == 0
    history = list(csv.DictReader(open(out / "history.csv")))
    assert [int(h["step"]) for h in history] == [50, 100]  # resumed, not restarted
    model = load_model(out / "daninet.pt")
    assert is_flow(model) and model.meta["steps"] == 100 and tuple(model.cfg.slice_band) == (50, 60)
    x = np.random.default_rng(1).uniform(0, 1, (20, 30)).astype(np.float32)
    frame = geometry.to_frame(x[None], model.cfg.frame_size)
    same, later = flow_predictions(model, frame, x, 70.0, 3, 55, [70.0, 80.0])
    assert np.array_equal(same, x) and later.shape == x.shape
    assert not any(torch.isnan(p).any() for p in model.parameters())


@pytest.mark.parametrize("content, message", [
    ("subject,age,path\n", "missing column"),
    ("subject,scan,age,group,path\ns1,0,old,HC,a.nii.gz\n", "not a number"),
    ("subject,scan,age,group,path\ns1,0,70,HC,missing.nii.gz\n", "image not found"),
])
def test_train_rejects_a_bad_cohort(tmp_path, capsys, content, message):
    path = tmp_path / "cohort.csv"
    path.write_text(content)
    assert main(["daninet", "train", "--data", str(path), "-o", str(tmp_path / "o"), "--tiny"]) == 2
    assert message in capsys.readouterr().err
