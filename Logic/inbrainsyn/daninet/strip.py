"""The preview's PNG strip: baseline and each target age (top row), change from baseline (bottom row).

Drawn with Pillow on numpy arrays rather than matplotlib: the preview is a fresh process each time
the Slicer module asks for one, and importing and drawing a matplotlib figure cost about 1.3 s of
the ~3 s budget (``benchmarks/bench_daninet_preview.py --end-to-end``; docs/daninet.md), against a
few milliseconds here. Pillow is already installed as a dependency of matplotlib.

Layout for n = 1 + len(targets) panels of a (Y, X) slice, each panel scaled to ``PANEL`` pixels
on its longer side::

    title
    [baseline a0] [t1] ... [tn]            grey, 0 -> black, 1 -> white
    [    blank  ] [t1 - x] ... [tn - x]     diverging map, -v blue, 0 white, +v red
    colour bar  -v ... 0 ... +v            v = largest |change| over all targets

Slices are shown with their first row at the bottom, as the earlier matplotlib strip did with
``origin="lower"`` (on the shipped template grid: anterior up, the subject's left on the left).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PANEL = 220  # pixels on the longer side of one slice panel
MARGIN = 6
LABEL_HEIGHT = 18

# ColorBrewer RdBu (7 classes), blue for loss of intensity, red for gain (matplotlib's "RdBu_r").
DIVERGING_ANCHORS = np.array([
    (33, 102, 172), (103, 169, 207), (209, 229, 240), (247, 247, 247),
    (253, 219, 199), (239, 138, 98), (178, 24, 43)], dtype=np.float64)


def diverging_rgb(values: np.ndarray, vmax: float) -> np.ndarray:
    """(Y, X) values -> (Y, X, 3) uint8: -vmax blue, 0 near-white, +vmax red (clipped beyond)."""
    vmax = float(vmax) if vmax > 0 else 1e-3
    pos = (np.clip(np.asarray(values, dtype=np.float64) / vmax, -1.0, 1.0) + 1.0) * 0.5 * (len(DIVERGING_ANCHORS) - 1)
    grid = np.arange(len(DIVERGING_ANCHORS))
    rgb = np.stack([np.interp(pos, grid, DIVERGING_ANCHORS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def grey_rgb(values: np.ndarray) -> np.ndarray:
    """(Y, X) values in [0, 1] -> (Y, X, 3) uint8 grey (clipped outside [0, 1])."""
    g = np.round(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _panel(rgb: np.ndarray, size: tuple[int, int]):
    """An (Y, X, 3) array as a PIL image of ``size`` (w, h), first row at the bottom."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(rgb[::-1])).resize(size, Image.BILINEAR)


def render_strip(baseline: np.ndarray, predictions: list[np.ndarray], labels: list[str], title: str):
    """The strip as a PIL RGB image; ``labels`` has 1 + len(predictions) entries (baseline first)."""
    from PIL import Image, ImageDraw

    ny, nx = baseline.shape
    scale = PANEL / max(ny, nx)
    w, h = max(1, round(nx * scale)), max(1, round(ny * scale))
    n = 1 + len(predictions)
    changes = [p - baseline for p in predictions]
    vmax = max((float(np.abs(c).max()) for c in changes), default=0.0) or 1e-3
    bar_h = 14
    width = MARGIN + n * (w + MARGIN)
    top = 2 * LABEL_HEIGHT
    height = top + 2 * (h + LABEL_HEIGHT) + MARGIN + bar_h + LABEL_HEIGHT + MARGIN
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, large = _font(12), _font(13)
    draw.text((MARGIN, 4), title, fill="black", font=large)
    for j, (img, label) in enumerate(zip([baseline] + list(predictions), labels)):
        x0 = MARGIN + j * (w + MARGIN)
        draw.text((x0, top - LABEL_HEIGHT + 2), label, fill="black", font=small)
        image.paste(_panel(grey_rgb(img), (w, h)), (x0, top))
        if j:
            y1 = top + h + LABEL_HEIGHT
            draw.text((x0, y1 - LABEL_HEIGHT + 2), "change", fill="black", font=small)
            image.paste(_panel(diverging_rgb(changes[j - 1], vmax), (w, h)), (x0, y1))
    # colour bar under the change maps
    y_bar = top + 2 * (h + LABEL_HEIGHT) + MARGIN
    x_bar0, x_bar1 = MARGIN + w + MARGIN, width - MARGIN
    ramp = np.linspace(-vmax, vmax, max(2, x_bar1 - x_bar0))[None, :].repeat(bar_h, axis=0)
    image.paste(Image.fromarray(diverging_rgb(ramp, vmax)), (x_bar0, y_bar))
    for frac, text in ((0.0, f"{-vmax:.3f}"), (0.5, "0"), (1.0, f"+{vmax:.3f}")):
        tx = x_bar0 + frac * (x_bar1 - x_bar0)
        tw = draw.textlength(text, font=small)
        draw.text((min(max(tx - tw / 2, x_bar0), x_bar1 - tw), y_bar + bar_h + 2), text, fill="black", font=small)
    draw.text((MARGIN, y_bar), "intensity", fill="black", font=small)
    draw.text((MARGIN, y_bar + bar_h + 2), "change", fill="black", font=small)
    return image


def write_strip_png(baseline: np.ndarray, predictions: list[np.ndarray], labels: list[str], title: str,
                    path: str | Path) -> None:
    """Write :func:`render_strip` as PNG to ``path`` (the caller makes the write atomic)."""
    render_strip(baseline, predictions, labels, title).save(str(path), format="PNG")
