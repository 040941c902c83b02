#!/usr/bin/env python
"""Figure of the AAL boundaries on MNI152 2009a, identity vs nonlinear carriage from Colin27.

    python tools/aal_label_figure.py [-o docs/images/aal_on_mni.png]

Reruns the builder's registration (inbrainsyn.templates.atlas_labels.aal_on_mni; 1-3 minutes on
2 cores) and draws hippocampus, amygdala and parahippocampal boundaries over the MNI T1 with the
MNI GM p = 0.5 contour, coronal and axial through the hippocampus.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="docs/images/aal_on_mni.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inbrainsyn.templates.atlas_labels import aal_on_mni
    from inbrainsyn.templates.default_bank import MNI_FILES, MRICRON, find_mni_dir

    d = find_mni_dir()
    t1_img = sitk.ReadImage(str(d / MNI_FILES["t1"]))
    t1 = sitk.GetArrayFromImage(t1_img).astype(float)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(d / MNI_FILES["gm"]))).astype(float) / 255
    mask = sitk.GetImageFromArray(ndi.binary_fill_holes(t1 > 0).astype(np.uint8))
    mask.CopyInformation(t1_img)
    carried = aal_on_mni(t1_img, mask, sitk.ReadImage(str(MRICRON / "aal.nii.gz")), sitk.ReadImage(str(MRICRON / "ch2bet.nii.gz")))
    ident, nonlin = (sitk.GetArrayFromImage(i) for i in (carried.identity, carried.nonlinear))
    z, y, _ = (int(c) for c in np.argwhere(np.isin(nonlin, (37, 38))).mean(0))
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.6), facecolor="black")
    for r, (name, lab) in enumerate((("identity (before)", ident), ("affine + SVF (shipped)", nonlin))):
        for c, (plane, cut) in enumerate((("coronal", lambda a: a[::-1, y, ::-1]), ("axial", lambda a: a[z, ::-1, ::-1]))):
            ax = axes[r, c]
            ax.imshow(cut(t1), cmap="gray")
            ax.contour(cut(gm) > 0.5, levels=[0.5], colors="yellow", linewidths=0.5)
            for values, colour in (((37, 38), "red"), ((41, 42), "cyan"), ((39, 40), "lime")):
                ax.contour(np.isin(cut(lab), values), levels=[0.5], colors=colour, linewidths=1.1)
            ax.set_title(f"{name}, {plane}", color="white", fontsize=10)
            ax.axis("off")
    fig.suptitle("AAL on MNI152 2009a: red hippocampus, cyan amygdala, green parahippocampal; yellow MNI GM p = 0.5",
                 color="white", fontsize=10)
    fig.savefig(args.output, dpi=80, facecolor="black")
    print(args.output)


if __name__ == "__main__":
    main()
