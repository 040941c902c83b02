#!/usr/bin/env python
"""Build the embedded demo input ``Resources/demo/subject.nii.gz`` (a synthetic subject, 1 mm, with skull).

The subject is the MNI152 2009a anatomy (1 mm, labels as in the default bank) aged from 55 to
``--age`` by the HC atrophy model, warped by a random inter-subject diffeomorphism, surrounded by a
synthetic skull and scalp, with a bias field (the phantom's acquisition model; noise optional, off by
default to keep the file near 2 MB).  It is synthetic: no real person's scan.

    python tools/build_demo_subject.py [--out Resources/demo] [--age 70] [--seed 2024]

Needs nilearn (MNI152 2009a) and Debian mricron-data's AAL (see docs/templates.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields, io
from inbrainsyn.phantom import acquire, random_affine_displacement, smooth_noise, synthetic_skull
from inbrainsyn.templates import atrophy
from inbrainsyn.templates.default_bank import base_anatomy_1mm, find_mni_dir
from inbrainsyn.templates.regions import CANONICAL_LABELS, argmax_labels, one_hot

PAD_MM = 12  # room for the skull and scalp around the intracranial volume


def pad(image: sitk.Image, voxels: int) -> sitk.Image:
    return sitk.ConstantPad(image, [voxels] * 3, [voxels] * 3, 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="Resources/demo")
    parser.add_argument("--age", type=float, default=70.0)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--noise", type=float, default=0.0, help="Rician noise, fraction of the intensity scale")
    parser.add_argument("--aal", default="/tmp/mricron/usr/share/mricron/templates/aal.nii.gz")
    args = parser.parse_args(argv)
    start = time.time()

    t1_img, lab_img = base_anatomy_1mm(find_mni_dir(), Path(args.aal))
    t1_img, lab_img = pad(t1_img, PAD_MM), pad(lab_img, PAD_MM)
    grid = fields.Grid.from_sitk(t1_img)
    t1 = fields.image_to_tensor(t1_img)
    labels = fields.image_to_tensor(lab_img).round().long()
    values = sorted(CANONICAL_LABELS)
    names = [CANONICAL_LABELS[v] for v in values]
    maps = one_hot(labels, values)
    spacing_zyx = tuple(reversed(grid.spacing))

    model = atrophy.AtrophyModel()
    ageing = atrophy.solve_ageing_svf(maps, names, model.targets("HC", model.base_age, args.age), spacing_zyx,
                                      solve_spacing_mm=3.0)
    rng = np.random.default_rng(args.seed)
    r = torch.from_numpy(smooth_noise(grid.shape, spacing_zyx, 15.0, rng, channels=3)).float() * 6.0
    psi = fields.compose(random_affine_displacement(grid.shape, spacing_zyx, rng), fields.exp(r))
    disp = fields.compose(fields.exp(ageing.velocity), psi)
    clean = fields.warp(t1, disp).numpy()
    subject_labels = argmax_labels(fields.warp(maps, disp), values).numpy()
    skull = synthetic_skull(subject_labels > 0, grid.spacing[0])
    clean = np.where(subject_labels > 0, clean, skull)
    bias = np.exp(0.12 * smooth_noise(grid.shape, spacing_zyx, 80.0, rng)[0])
    # uint8 (0-255), air exactly 0 (as after a scanner's background suppression); noise is optional
    # because it does not compress (0.8 % noise: 3.3 MB instead of ~2 MB)
    image = acquire(clean, 250.0, 1.0, bias, args.noise, rng if args.noise > 0 else None)
    head = (clean > 0.02) | (subject_labels > 0)
    image = np.where(head, image, 0.0)

    out = Path(args.out)
    io.write_image(sitk.Cast(grid.apply_to(sitk.GetImageFromArray(np.round(image).clip(0, 255).astype(np.uint8))),
                             sitk.sitkUInt8), out / "subject.nii.gz")
    io.write_json({
        "image": "subject.nii.gz",
        "age": args.age,
        "cohort": "HC",
        "synthetic": True,
        "description": (f"Synthetic demo subject: MNI152 2009a anatomy aged 55 -> {args.age:g} by the HC atrophy "
                        "model, random inter-subject deformation, synthetic skull/scalp, bias field and noise. "
                        "Not a real person's scan."),
        "builder": f"tools/build_demo_subject.py --age {args.age:g} --seed {args.seed} --noise {args.noise:g}",
        "regional_log_volume_change_from_55": {n: round(v, 4) for n, v in ageing.achieved.items()},
    }, out / "subject.json")
    size = (out / "subject.nii.gz").stat().st_size
    print(f"demo subject written to {out} ({size / 1e6:.2f} MB, {time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
