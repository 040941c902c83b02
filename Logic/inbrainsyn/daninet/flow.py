"""The slice-ageing model shipped for the DaniNet preview: a conditional displacement + residual net.

Why not the adversarial autoencoder alone. The DaniNet generator (``model.py``) reconstructs the
slice through a 100-d code; at a CPU training budget its reconstructions are blurred and its age
effect came out 0.13 dB better than copying the slice (model card, first version). This model starts
AT the copy and learns only the change, which is what a 2-6 year preview is:

    y(t) = W(x; (t - a0) u) + (t - a0) r,      (u, r) = N(x, c),

with x the subject's baseline slice in the 128 x 128 frame ([-1, 1]), W bilinear warping by a
displacement in frame pixels, u (2 channels, pixels per year) and r (1 channel, intensity per year)
the outputs of a small U-Net N whose last layer is initialised at zero (so the untrained model IS the
copy), and c the conditioning: DaniNet's diagnosis class (CN / SMC / MCI / AD one-hot; converters
averaged over their source and target classes in training), the baseline age ((a0 - 75) / 10) and
the slice position (soft code over the covered band, as ``conditioning.slice_code``). c enters every
U-Net block as a per-channel bias (a linear map of c). The change is linear in the interval t - a0:
the phantom's and the bank's atrophy rates are smooth in age, and a linear model cannot invent a
change for t = a0 (y(a0) = x exactly). Backward targets (t < a0) use the same rates, negated.

The checkpoint keeps the interface the preview uses of a DaniNet: ``cfg.slice_band``,
``cfg.frame_size`` and ``meta`` (``grid_size_zyx`` ...), so the CLI and the Slicer module can
load either kind (:func:`inbrainsyn.daninet.preview.load_model`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inbrainsyn.daninet import conditioning as cond
from inbrainsyn.errors import InputError

FORMAT = "inbrainsyn-daninet-flow"
FORMAT_VERSION = 1
AGE_CENTRE, AGE_SCALE = 75.0, 10.0


@dataclasses.dataclass
class FlowConfig:
    frame_size: int = 128
    net_size: int = 64
    channels: tuple[int, ...] = (8, 16, 32, 32)
    n_slice_anchors: int = 10
    slice_band: tuple[int, int] = (0, 0)

    @property
    def cond_dim(self) -> int:
        return len(cond.DIAGNOSIS_CLASSES) + 1 + self.n_slice_anchors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        d["slice_band"] = tuple(d["slice_band"])
        return cls(**d)


class _Block(nn.Module):
    """Two 3x3 convs (GroupNorm-free, LeakyReLU) with the conditioning added as a channel bias."""

    def __init__(self, cin: int, cout: int, cdim: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(cdim, cout)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.c1(h) + self.film(c)[:, :, None, None], 0.1)
        return F.leaky_relu(self.c2(h), 0.1)


class SliceAgeingNet(nn.Module):
    """U-Net (channels ``cfg.channels``, 2x down/up per level, on the frame pooled to ``net_size``)
    -> (u: 2, r: 1) per year."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        ch, cd = list(cfg.channels), cfg.cond_dim
        self.down = nn.ModuleList()
        cin = 1
        for c in ch:
            self.down.append(_Block(cin, c, cd))
            cin = c
        self.up = nn.ModuleList(_Block(ch[i + 1] + ch[i], ch[i], cd) for i in reversed(range(len(ch) - 1)))
        self.head = nn.Conv2d(ch[0], 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.meta: dict = {}

    def conditioning(self, dx: torch.Tensor, age: torch.Tensor, slice_index: torch.Tensor) -> torch.Tensor:
        """c = [diagnosis one-hot (or soft), (a0 - 75) / 10, slice code]: (B, cond_dim).

        ``dx``: (B,) class indices, or (B, 4) soft class weights."""
        dx = torch.as_tensor(dx)
        d = cond.one_hot(dx, len(cond.DIAGNOSIS_CLASSES)) if dx.ndim == 1 else dx.float()
        a = (torch.as_tensor(age, dtype=torch.float32).reshape(-1, 1) - AGE_CENTRE) / AGE_SCALE
        s = cond.slice_code(torch.as_tensor(slice_index).reshape(-1), self.cfg.slice_band, self.cfg.n_slice_anchors)
        return torch.cat([d, a, s], dim=1)

    def rates(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, r) per year: (B, 2, S, S) pixels (x, y order), (B, 1, S, S) intensity in [-1, 1] units.

        The U-Net runs on the frame average-pooled to ``net_size`` (the rates are smooth); u and r
        are upsampled bilinearly to the frame (u rescaled to frame pixels)."""
        size = x.shape[-1]
        h = F.adaptive_avg_pool2d(x, self.cfg.net_size) if self.cfg.net_size < size else x
        skips = []
        for i, block in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h, c)
            skips.append(h)
        for j, block in enumerate(self.up):
            skip = skips[-2 - j]
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1), c)
        out = self.head(h)
        if out.shape[-1] != size:
            out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
            out = torch.cat([out[:, :2] * (size / h.shape[-1]), out[:, 2:]], dim=1)
        return out[:, :2], out[:, 2:]

    @staticmethod
    def warp(x: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        """Bilinear W(x; disp): out(p) = x(p + disp(p)), disp in pixels (x, y), border padding."""
        b, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype, device=x.device),
                                torch.arange(w, dtype=x.dtype, device=x.device), indexing="ij")
        gx = (xs[None] + disp[:, 0]) * (2.0 / (w - 1)) - 1.0
        gy = (ys[None] + disp[:, 1]) * (2.0 / (h - 1)) - 1.0
        return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border",
                             align_corners=True)

    def predict(self, x: torch.Tensor, c: torch.Tensor, gaps: torch.Tensor,
                rates: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """y = W(x; gap u) + gap r for each sample (gaps (B,) years); frames in [-1, 1]."""
        u, r = rates if rates is not None else self.rates(x, c)
        g = torch.as_tensor(gaps, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return (self.warp(x, g * u) + g * r).clamp(-1.0, 1.0)

    def save(self, path: str | Path, half: bool = True) -> None:
        """Weights (fp16 when ``half``) + config + metadata, written atomically."""
        sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in self.state_dict().items()}
        blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.cfg.to_dict(), "state": sd,
                "meta": self.meta}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)

    @classmethod
    def from_blob(cls, blob: dict) -> "SliceAgeingNet":
        model = cls(FlowConfig.from_dict(blob["config"]))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()})
        model.meta = blob.get("meta") or {}
        return model.eval()


def read_blob(path: str | Path) -> dict:
    """The dict of a weights file of either kind (``inbrainsyn-daninet`` or ``-flow``)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable / not a torch file
        raise InputError(f"cannot read DaniNet weights {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT, "inbrainsyn-daninet"):
        raise InputError(f"{path} is not an inbrainsyn DaniNet weights file")
    return blob
