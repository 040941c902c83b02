"""DaniNet training: alternating D_z / D_b / (E, G) Adam updates, as in the CAAE family.

One step on a batch (x, a, d, k):
  z = E(x); bins j = choose_bins(b(a)); g_j = G(z, j, d, k)
  D_z  <- BCE(D_z(u ~ U(-1,1)), 1) + BCE(D_z(z), 0)
  D_b  <- BCE(D_b(x, l), 1) + BCE(D_b(g_{b(a)}, l), 0),   l = labels(b(a), d, k)
  E, G <- w0 L_def + w1 BCE(D_b(g_{b(a)}, l), 1) + w2 BCE(D_z(z), 1) + w3 L_vox + w4 L_reg
Weights (w0..w4) default to the code's (100, 0.002, 0.05, 1.25, 1.25), kept constant (the code
anneals them per epoch); Adam lr 3e-4, beta1 0.5. Checkpoints every epoch (``checkpoint.pt``,
resumable), loss history ``history.csv`` and curves ``loss_curves.png``, final ``daninet.pt``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.daninet import losses
from inbrainsyn.daninet.data import SliceSet
from inbrainsyn.daninet.model import DaniNet
from inbrainsyn.daninet.regressors import RegionRegressors

LOSS_NAMES = ("def", "g_adv", "ez_adv", "vox", "reg", "eg_total", "d_z", "d_b")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-4
    beta1: float = 0.5
    weights: tuple[float, float, float, float, float] = (100.0, 0.002, 0.05, 1.25, 1.25)
    bins_per_sample: int = 5
    seed: int = 0


def choose_bins(true_bin: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(B,) true bins -> (B, K) sorted bins: b-1, b, b+1 (when they exist) + random others."""
    nb = cond.N_AGE_BINS
    k = min(k, nb)
    out = np.empty((len(true_bin), k), dtype=np.int64)
    for i, b in enumerate(true_bin):
        chosen = [j for j in (b - 1, b, b + 1) if 0 <= j < nb][:k]
        others = [j for j in range(nb) if j not in chosen]
        chosen += rng.choice(others, size=k - len(chosen), replace=False).tolist()
        out[i] = np.sort(chosen)
    return out


def make_optimisers(model: DaniNet, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    betas = (cfg.beta1, 0.999)
    return {
        "eg": torch.optim.Adam(list(model.E.parameters()) + list(model.G.parameters()), lr=cfg.lr, betas=betas),
        "dz": torch.optim.Adam(model.Dz.parameters(), lr=cfg.lr, betas=betas),
        "db": torch.optim.Adam(model.Db.parameters(), lr=cfg.lr, betas=betas),
    }


def eg_losses(model: DaniNet, x, age, dx, k, bins, regressors, rng, weights) -> dict[str, torch.Tensor]:
    """The (E, G) objective and its terms for one batch (no optimiser step)."""
    b, kb = bins.shape
    true_bin = torch.as_tensor([cond.age_bin(a) for a in age.tolist()])
    z = model.E(x)
    lab = model.labels(bins.flatten(), dx.repeat_interleave(kb), k.repeat_interleave(kb))
    g = model.G(z.repeat_interleave(kb, dim=0), lab).view(b, kb, *x.shape[1:])
    pos_true = (bins == true_bin[:, None]).float().argmax(dim=1)
    g_true = g[torch.arange(b), pos_true]
    lab_true = model.labels(true_bin, dx, k)
    out = {
        "def": losses.loss_def(g, x, losses.def_weights(age, bins)),
        "g_adv": losses.bce_logits(model.Db(g_true, lab_true), real=True),
        "ez_adv": losses.bce_logits(model.Dz(z), real=True),
        "vox": losses.loss_vox(g, x, bins, true_bin),
        "reg": (losses.loss_reg(g, bins, dx, k, regressors, rng) if regressors is not None else x.new_zeros(())),
    }
    w = weights
    out["eg_total"] = (w[0] * out["def"] + w[1] * out["g_adv"] + w[2] * out["ez_adv"]
                       + w[3] * out["vox"] + w[4] * out["reg"])
    out["_z"], out["_g_true"], out["_lab_true"] = z, g_true, lab_true
    return out


def train_step(model: DaniNet, opts: dict, batch: tuple, cfg: TrainConfig,
               regressors: RegionRegressors | None, rng: np.random.Generator,
               update_discriminators: bool = True) -> dict[str, float]:
    """One alternating update on batch (x (B,1,S,S), age (B,), dx (B,), slice (B,)); returns losses."""
    x, age, dx, k = batch
    model.train()
    bins = torch.as_tensor(choose_bins(np.array([cond.age_bin(a) for a in age.tolist()]), cfg.bins_per_sample, rng))
    out = eg_losses(model, x, age, dx, k, bins, regressors, rng, cfg.weights)
    z, g_true, lab_true = out.pop("_z"), out.pop("_g_true"), out.pop("_lab_true")
    opts["eg"].zero_grad(set_to_none=True)
    out["eg_total"].backward()
    opts["eg"].step()
    if update_discriminators:
        prior = torch.rand_like(z) * 2.0 - 1.0
        d_z = losses.bce_logits(model.Dz(prior), True) + losses.bce_logits(model.Dz(z.detach()), False)
        opts["dz"].zero_grad(set_to_none=True)
        d_z.backward()
        opts["dz"].step()
        d_b = (losses.bce_logits(model.Db(x, lab_true), True)
               + losses.bce_logits(model.Db(g_true.detach(), lab_true), False))
        opts["db"].zero_grad(set_to_none=True)
        d_b.backward()
        opts["db"].step()
        out["d_z"], out["d_b"] = d_z, d_b
    return {name: float(v.detach()) for name, v in out.items()}


def batches(data: SliceSet, batch_size: int, rng: np.random.Generator):
    """Shuffled mini-batches (x, age, dx, slice) of a SliceSet; the last partial batch is kept if >= 2."""
    order = rng.permutation(len(data))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if len(rows) < 2:  # BatchNorm in the discriminators needs 2 samples
            continue
        t = torch.as_tensor
        yield (data.frames[t(rows)], t(data.age[rows], dtype=torch.float32), t(data.dx[rows]), t(data.slice_index[rows]))


def train(model: DaniNet, data: SliceSet, out_dir: str | Path, cfg: TrainConfig,
          resume: bool = False, progress: bool = True, log=print, max_seconds: float | None = None) -> list[dict]:
    """Train for cfg.epochs (continuing from ``checkpoint.pt`` when resume); returns per-epoch history.

    ``max_seconds``: stop after the first epoch that ends past this wall time (checkpoint kept)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if model.regressors is None:
        regs = RegionRegressors.fit(data.frames, data.subject_codes(), data.age, data.dx, data.slice_index)
        model.regressors = regs.to_state()
    regressors = RegionRegressors.from_state(model.regressors)
    opts = make_optimisers(model, cfg)
    history, start_epoch = [], 0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        start_epoch, history = load_checkpoint(ckpt_path, model, opts, rng)
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    started = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        sums, n, t0 = {}, 0, time.time()
        steps = list(batches(data, cfg.batch_size, rng))
        it = steps
        if progress:
            from tqdm import tqdm
            it = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for batch in it:
            losses_ = train_step(model, opts, batch, cfg, regressors, rng)
            for key, v in losses_.items():
                sums[key] = sums.get(key, 0.0) + v
            n += 1
            if progress:
                it.set_postfix(def_=f"{losses_['def']:.4f}", vox=f"{losses_['vox']:.4f}")
        row = {"epoch": epoch + 1, "seconds": time.time() - t0, **{k: sums.get(k, 0.0) / max(n, 1) for k in LOSS_NAMES}}
        history.append(row)
        log(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
        save_checkpoint(ckpt_path, model, opts, epoch + 1, history, rng)
        write_history(out_dir, history)
        if max_seconds is not None and time.time() - started > max_seconds:
            log(f"stopping after epoch {epoch + 1}: time limit {max_seconds:.0f}s reached")
            break
    model.eval()
    return history


def save_checkpoint(path: Path, model: DaniNet, opts: dict, epoch: int, history: list, rng) -> None:
    blob = {"epoch": epoch, "history": history, "config": model.cfg.to_dict(),
            "nets": {n: getattr(model, n).state_dict() for n in ("E", "G", "Dz", "Db")},
            "opts": {n: o.state_dict() for n, o in opts.items()}, "regressors": model.regressors,
            "meta": model.meta, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: DaniNet, opts: dict, rng) -> tuple[int, list]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    for n, sd in blob["nets"].items():
        getattr(model, n).load_state_dict(sd)
    for n, sd in blob["opts"].items():
        opts[n].load_state_dict(sd)
    model.regressors = blob["regressors"]
    rng.bit_generator.state = blob["rng"]
    torch.set_rng_state(blob["torch_rng"])
    return int(blob["epoch"]), list(blob["history"])


def write_history(out_dir: Path, history: list[dict]) -> None:
    """history.csv and loss_curves.png (one panel per loss term)."""
    keys = list(history[0].keys())
    tmp = out_dir / "history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    tmp.replace(out_dir / "history.csv")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    ep = [h["epoch"] for h in history]
    for ax, name in zip(axes.flat, LOSS_NAMES):
        ax.plot(ep, [h[name] for h in history], marker="o", ms=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.tmp.png", dpi=80)
    plt.close(fig)
    (out_dir / "loss_curves.tmp.png").replace(out_dir / "loss_curves.png")
