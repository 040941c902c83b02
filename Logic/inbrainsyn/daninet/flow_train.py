"""Training the slice-ageing model (``flow.py``) on a longitudinal phantom cohort.

Data. Every subject of ``cohort.csv`` (``inbrainsyn phantom`` output, or any cohort with the
``subject, scan, age, group, path`` columns) is aligned to the template as the preview aligns a
scan: the coarse 8/4 mm affine of its baseline (``alignment.coarse_alignment``), reused for its
follow-ups (same subject space). Every scan is resampled onto the template grid through it,
normalised (``geometry.normalise_intensity``) and the band's axial slices are put into the 128 x 128
frame. The prepared frames are cached (``frames.pt``) so a resumed run does not align again.

Pairs. Every ordered pair of scans (i, j), i != j, of a subject and every slice k of the band is a
sample: input the slice of scan i at age a_i, target the slice of scan j at a_j (the noisy scan:
what a cohort offers), gap a_j - a_i (negative gaps train the backward direction). Class c: the
average of the one-hots of scans i and j (a converter's MCI -> AD pair is half MCI, half AD).

Loss. mean (y - x_j)^2 over the frame + ``smooth`` * mean |grad u|^2 + ``sparsity`` * mean |r|
(u, r the per-year rates). Adam, lr 1e-3, batch 16. A checkpoint (``checkpoint.pt``: model,
optimiser, step, history, RNG) every ``checkpoint_every`` steps and at the end; ``resume`` continues
from it. ``history.csv`` has the mean losses of every block of steps, and the mean squared error of
the copy (gap 0) on the same batches, so the gain over copying is visible while training.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn.daninet import geometry
from inbrainsyn.daninet.data import Scan
from inbrainsyn.daninet.flow import FlowConfig, SliceAgeingNet


@dataclasses.dataclass
class FlowTrainConfig:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    smooth: float = 0.02
    sparsity: float = 0.002
    checkpoint_every: int = 200
    seed: int = 0


def align_subject(scans: list[Scan], reference: sitk.Image, brain_mask: sitk.Image, identity: bool = False) -> list[np.ndarray]:
    """Each scan of one subject on the template grid (Z, Y, X) in [0, 1], through the baseline's coarse affine."""
    from inbrainsyn.daninet import alignment as align

    base = sitk.ReadImage(str(scans[0].path), sitk.sitkFloat32)
    transform = sitk.Transform(3, sitk.sitkIdentity) if identity else align.coarse_alignment(base, reference, brain_mask)
    out = []
    for s in scans:
        img = base if s is scans[0] else sitk.ReadImage(str(s.path), sitk.sitkFloat32)
        vol = sitk.GetArrayFromImage(align.to_template_grid(img, reference, transform))
        out.append(geometry.normalise_intensity(vol))
    return out


def prepare(scans: list[Scan], band: tuple[int, int], cache: Path, frame_size: int = 128,
            identity: bool = False) -> dict:
    """Frames (N_scans, K, 1, S, S) float16 of the band's slices + per-scan labels; cached in ``cache``."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    from tqdm import tqdm

    from inbrainsyn.templates import load_bank

    bank = load_bank(None)
    by_subject: dict[str, list[Scan]] = {}
    for s in scans:
        by_subject.setdefault(s.subject, []).append(s)
    frames, subj, ages, dx = [], [], [], []
    ks = list(range(band[0], band[1] + 1))
    for name, group in tqdm(sorted(by_subject.items()), desc="aligning subjects", unit="subject"):
        group = sorted(group, key=lambda s: s.age)
        cohort = "AD" if group[0].dx == 3 else "HC"
        lo, hi = bank.age_range(cohort)
        reference = bank.template(cohort, min(max(group[0].age, lo), hi))
        for s, vol in zip(group, align_subject(group, reference, bank.mask, identity)):
            frames.append(geometry.to_frame(vol[ks], frame_size).half())
            subj.append(name)
            ages.append(s.age)
            dx.append(s.dx)
        grid = list(reversed(reference.GetSize()))
    data = {"frames": torch.stack(frames), "subject": subj, "age": torch.tensor(ages, dtype=torch.float32),
            "dx": torch.tensor(dx), "slices": ks, "grid_size_zyx": grid,
            "grid_geometry": geometry.grid_geometry(bank.mask)}
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(cache)
    return data


def pair_index(data: dict) -> np.ndarray:
    """All ordered (i, j) scan pairs of the same subject, i != j: (P, 2)."""
    subj = np.asarray(data["subject"])
    pairs = [(i, j) for i in range(len(subj)) for j in range(len(subj)) if i != j and subj[i] == subj[j]]
    return np.asarray(pairs, dtype=np.int64)


def batch(data: dict, pairs: np.ndarray, rng: np.random.Generator, size: int):
    """(x, y, c-inputs, gaps) for ``size`` random (pair, slice) samples."""
    p = pairs[rng.integers(0, len(pairs), size)]
    kk = rng.integers(0, len(data["slices"]), size)
    i, j = torch.as_tensor(p[:, 0]), torch.as_tensor(p[:, 1])
    k = torch.as_tensor(kk)
    x = data["frames"][i, k].float()
    y = data["frames"][j, k].float()
    n = 4
    dx = 0.5 * (torch.nn.functional.one_hot(data["dx"][i], n) + torch.nn.functional.one_hot(data["dx"][j], n)).float()
    slice_index = torch.as_tensor(np.asarray(data["slices"])[kk])
    return x, y, dx, data["age"][i], slice_index, data["age"][j] - data["age"][i]


def step_losses(model: SliceAgeingNet, x, y, dx, age, slice_index, gaps, cfg: FlowTrainConfig) -> dict:
    c = model.conditioning(dx, age, slice_index)
    u, r = model.rates(x, c)
    pred = model.predict(x, c, gaps, rates=(u, r))
    mse = ((pred - y) ** 2).mean()
    smooth = ((u[:, :, 1:, :] - u[:, :, :-1, :]) ** 2).mean() + ((u[:, :, :, 1:] - u[:, :, :, :-1]) ** 2).mean()
    sparse = r.abs().mean()
    return {"mse": mse, "smooth": smooth, "sparse": sparse, "copy_mse": ((x - y) ** 2).mean().detach(),
            "total": mse + cfg.smooth * smooth + cfg.sparsity * sparse}


def train(model: SliceAgeingNet, data: dict, out: Path, cfg: FlowTrainConfig, resume: bool = False,
          max_seconds: float | None = None, log_every: int = 50) -> list[dict]:
    """Adam on random (pair, slice) batches; checkpoints in ``out``; returns the history rows."""
    out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, history, elapsed0 = 0, [], 0.0
    ck = out / "checkpoint.pt"
    if resume and ck.is_file():
        state = torch.load(ck, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history, elapsed0 = state["step"], state["history"], state.get("elapsed", 0.0)
        rng.bit_generator.state = state["rng"]
        print(f"resumed at step {step} ({elapsed0:.0f}s trained)")
    pairs = pair_index(data)
    t0 = time.time()
    acc = {}
    model.train()

    def save_checkpoint():
        tmp = ck.with_name(ck.name + ".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
                    "rng": rng.bit_generator.state, "elapsed": elapsed0 + time.time() - t0}, tmp)
        tmp.replace(ck)
        write_history(history, out / "history.csv")

    while step < cfg.steps:
        x, y, dx, age, k, gaps = batch(data, pairs, rng, cfg.batch_size)
        losses = step_losses(model, x, y, dx, age, k, gaps, cfg)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        step += 1
        for key, v in losses.items():
            acc.setdefault(key, []).append(float(v.detach()))
        if step % log_every == 0:
            row = {"step": step, "seconds": round(elapsed0 + time.time() - t0, 1),
                   **{key: float(np.mean(v)) for key, v in acc.items()}}
            row["gain_db"] = float(10 * np.log10(row["copy_mse"] / row["mse"]))
            history.append(row)
            acc = {}
            print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if step % cfg.checkpoint_every == 0:
            save_checkpoint()
        if max_seconds is not None and time.time() - t0 > max_seconds:
            print(f"time limit reached at step {step}")
            break
    save_checkpoint()
    model.meta["steps"] = step
    model.meta["train_seconds"] = round(elapsed0 + time.time() - t0, 1)
    model.eval()
    return history


def write_history(history: list[dict], path: Path) -> None:
    if not history:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0].keys()))
        w.writeheader()
        w.writerows(history)
    tmp.replace(path)


def new_model(band: tuple[int, int], grid_size_zyx, tiny: bool = False,
              grid_geometry: dict | None = None) -> SliceAgeingNet:
    """An untrained model for the template grid of size ``grid_size_zyx``; ``grid_geometry``
    (spacing, origin, direction of that grid, :func:`geometry.grid_geometry`) lets a preview with a
    reused alignment run without loading the template bank."""
    cfg = FlowConfig(slice_band=tuple(band)) if not tiny else FlowConfig(slice_band=tuple(band), channels=(4, 8),
                                                                         frame_size=32, net_size=16)
    model = SliceAgeingNet(cfg)
    model.meta = {"kind": "flow", "grid_size_zyx": list(grid_size_zyx), **(grid_geometry or {})}
    return model


def brain_band(mask: sitk.Image, fraction: float = 0.2) -> tuple[int, int]:
    """First and last axial slice whose brain area is >= ``fraction`` of the largest slice's.

    On the shipped bank (1.5 mm, 107 slices) this is 10 .. 99, which contains every slice whose
    area is >= 20 % brain (12 .. 97)."""
    m = sitk.GetArrayFromImage(mask) > 0.5
    area = m.reshape(m.shape[0], -1).sum(axis=1)
    ks = np.flatnonzero(area >= fraction * area.max())
    return int(ks.min()), int(ks.max())
