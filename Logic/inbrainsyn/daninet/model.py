"""DaniNet networks: encoder E, generator G, latent discriminator D_z, image discriminator D_b.

Architecture as the public code (METHODS.md section 4), with configurable widths:

* E: 5 conv 5x5 stride 2 (1 -> c1 -> ... -> c5, ReLU), 128^2 -> 4^2, FC -> z in R^{z_dim}, tanh.
* G: [z, tile(age one-hot, k_age), tile(diagnosis one-hot, k_dx), tile(slice code, k_sl)]
  -> FC -> (c5, 4, 4) -> 5 deconv 5x5 stride 2 (ReLU) -> 2 stride-1 deconvs (``final_kernel``; paper 5x5) -> tanh.
* D_z: FC 64-32-16-1 with BN (ReLU), logits; trained to tell z = E(x) from z ~ U(-1, 1).
* D_b: conv 5x5 stride 2 (1 -> d1), then the labels as constant maps are concatenated,
  conv d1 -> d2 -> d3 -> d4 (BN, leaky ReLU), FC (paper 1024, here ``disc_fc``) -> 1, logits.

The paper's widths (c = 64..1024, z = 200) give ~60 M parameters; the shipped model uses
narrower channels (see ``DaniNetConfig`` defaults and the model card) to train on CPU and
ship under 20 MB. The slice-position code is our addition (one model for a band of slices).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.errors import InputError

FORMAT_VERSION = 1


@dataclasses.dataclass
class DaniNetConfig:
    """Sizes of the four networks (defaults: the shipped CPU-sized model)."""

    frame_size: int = 128
    enc_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    gen_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    disc_channels: tuple[int, ...] = (8, 16, 32, 64)
    disc_fc: int = 256
    final_kernel: int = 3
    z_dim: int = 100
    age_tile: int = 5
    dx_tile: int = 5
    slice_tile: int = 2
    n_slice_anchors: int = 8
    slice_band: tuple[int, int] = (0, 0)

    @property
    def plain_label_dim(self) -> int:
        """Length of the untiled label vector [age one-hot, diagnosis one-hot, slice code]."""
        return cond.N_AGE_BINS + len(cond.DIAGNOSIS_CLASSES) + self.n_slice_anchors

    @property
    def label_dim(self) -> int:
        """Length of the tiled label vector [age, diagnosis, slice]."""
        return (cond.N_AGE_BINS * self.age_tile + len(cond.DIAGNOSIS_CLASSES) * self.dx_tile
                + self.n_slice_anchors * self.slice_tile)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DaniNetConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        return cls(**kw)


def labels(cfg: DaniNetConfig, age_bin: torch.Tensor, dx: torch.Tensor, slice_index: torch.Tensor) -> torch.Tensor:
    """Untiled label vector (B, plain_label_dim) from age-bin (B,), diagnosis (B,), slice index (B,)."""
    a = cond.one_hot(age_bin, cond.N_AGE_BINS)
    d = cond.one_hot(dx, len(cond.DIAGNOSIS_CLASSES))
    s = cond.slice_code(slice_index, tuple(cfg.slice_band), cfg.n_slice_anchors)
    return torch.cat([a, d, s], dim=1)


def tile_labels(cfg: DaniNetConfig, lab: torch.Tensor) -> torch.Tensor:
    """Tile each part of an untiled label vector (B, plain_label_dim) -> (B, label_dim), as G sees it."""
    na, nd = cond.N_AGE_BINS, len(cond.DIAGNOSIS_CLASSES)
    a, d, s = lab[:, :na], lab[:, na:na + nd], lab[:, na + nd:]
    return torch.cat([a.repeat(1, cfg.age_tile), d.repeat(1, cfg.dx_tile), s.repeat(1, cfg.slice_tile)], dim=1)


class Encoder(nn.Module):
    """E: (B, 1, S, S) in [-1, 1] -> z (B, z_dim) in (-1, 1)."""

    def __init__(self, cfg: DaniNetConfig):
        super().__init__()
        layers, c_in = [], 1
        for c in cfg.enc_channels:
            layers += [nn.Conv2d(c_in, c, 5, stride=2, padding=2), nn.ReLU(inplace=True)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = cfg.frame_size // 2 ** len(cfg.enc_channels)
        self.fc = nn.Linear(c_in * side * side, cfg.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.conv(x).flatten(1)))


class Generator(nn.Module):
    """G: z (B, z_dim), untiled labels (B, plain_label_dim) -> image (B, 1, S, S) in (-1, 1)."""

    def __init__(self, cfg: DaniNetConfig):
        super().__init__()
        self.cfg = cfg
        self.c0 = cfg.gen_channels[0]
        self.side = cfg.frame_size // 2 ** len(cfg.gen_channels)
        self.fc = nn.Sequential(nn.Linear(cfg.z_dim + cfg.label_dim, self.c0 * self.side**2), nn.ReLU(inplace=True))
        layers, c_in = [], self.c0
        for c in list(cfg.gen_channels[1:]) + [cfg.gen_channels[-1]]:
            layers += [nn.ConvTranspose2d(c_in, c, 5, stride=2, padding=2, output_padding=1), nn.ReLU(inplace=True)]
            c_in = c
        c_mid, k = max(c_in // 2, 4), cfg.final_kernel
        layers += [nn.ConvTranspose2d(c_in, c_mid, k, stride=1, padding=k // 2), nn.ReLU(inplace=True),
                   nn.ConvTranspose2d(c_mid, 1, k, stride=1, padding=k // 2)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, tile_labels(self.cfg, lab)], dim=1)).view(-1, self.c0, self.side, self.side)
        return torch.tanh(self.deconv(h))


class LatentDiscriminator(nn.Module):
    """D_z: z (B, z_dim) -> logit (B,) that z was drawn from the prior U(-1, 1)."""

    def __init__(self, cfg: DaniNetConfig):
        super().__init__()
        layers, c_in = [], cfg.z_dim
        for c in (64, 32, 16):
            layers += [nn.Linear(c_in, c), nn.BatchNorm1d(c), nn.ReLU(inplace=True)]
            c_in = c
        layers.append(nn.Linear(c_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


class ImageDiscriminator(nn.Module):
    """D_b: image (B, 1, S, S), untiled labels (B, plain_label_dim) -> logit (B,) that the image is real.

    The labels enter untiled (tiling constant maps adds nothing to a convolution but cost)."""

    def __init__(self, cfg: DaniNetConfig):
        super().__init__()
        d = cfg.disc_channels
        self.first = nn.Sequential(nn.Conv2d(1, d[0], 5, stride=2, padding=2), nn.BatchNorm2d(d[0]),
                                   nn.LeakyReLU(0.2, inplace=True))
        layers, c_in = [], d[0] + cfg.plain_label_dim
        for c in d[1:]:
            layers += [nn.Conv2d(c_in, c, 5, stride=2, padding=2), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.rest = nn.Sequential(*layers)
        side = cfg.frame_size // 2 ** len(d)
        self.fc = nn.Sequential(nn.Linear(c_in * side * side, cfg.disc_fc),
                                nn.LeakyReLU(0.2, inplace=True), nn.Linear(cfg.disc_fc, 1))

    def forward(self, x: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        maps = lab[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        return self.fc(self.rest(torch.cat([h, maps], dim=1)).flatten(1)).squeeze(1)


class DaniNet(nn.Module):
    """The four networks plus what inference needs: config, regressors, metadata."""

    def __init__(self, cfg: DaniNetConfig):
        super().__init__()
        self.cfg = cfg
        self.E = Encoder(cfg)
        self.G = Generator(cfg)
        self.Dz = LatentDiscriminator(cfg)
        self.Db = ImageDiscriminator(cfg)
        self.regressors: dict | None = None  # see regressors.RegionRegressors.to_state
        self.meta: dict = {}

    def labels(self, age_bin: torch.Tensor, dx: torch.Tensor, slice_index: torch.Tensor) -> torch.Tensor:
        return labels(self.cfg, age_bin, dx, slice_index)

    def generate_all_bins(self, z: torch.Tensor, dx: torch.Tensor, slice_index: torch.Tensor) -> torch.Tensor:
        """G(z, b, d, k) at every age bin b: (B, z_dim) -> (B, n_bins, 1, S, S)."""
        b, nb = z.shape[0], cond.N_AGE_BINS
        bins = torch.arange(nb).repeat(b)
        lab = self.labels(bins, dx.repeat_interleave(nb), slice_index.repeat_interleave(nb))
        out = self.G(z.repeat_interleave(nb, dim=0), lab)
        return out.view(b, nb, *out.shape[1:])

    def save(self, path: str | Path, include_discriminators: bool = True, half: bool = False) -> None:
        """Write weights + config + regressors + metadata atomically (a torch file)."""
        nets = ["E", "G"] + (["Dz", "Db"] if include_discriminators else [])
        state = {}
        for name in nets:
            sd = getattr(self, name).state_dict()
            state[name] = {k: (v.half() if half and v.is_floating_point() else v) for k, v in sd.items()}
        blob = {"format": "inbrainsyn-daninet", "format_version": FORMAT_VERSION,
                "config": self.cfg.to_dict(), "state": state,
                "regressors": self.regressors, "meta": self.meta}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "DaniNet":
        """Load a file written by :meth:`save`; missing discriminators are left at init."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"DaniNet weights not found: {path} (train them with "
                             "'inbrainsyn daninet train' or reinstall the package)")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable / not a torch file
            raise InputError(f"cannot read DaniNet weights {path}: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") != "inbrainsyn-daninet":
            raise InputError(f"{path} is not an inbrainsyn DaniNet weights file")
        model = cls(DaniNetConfig.from_dict(blob["config"]))
        for name, sd in blob["state"].items():
            getattr(model, name).load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        model.regressors = blob.get("regressors")
        model.meta = blob.get("meta") or {}
        return model.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
