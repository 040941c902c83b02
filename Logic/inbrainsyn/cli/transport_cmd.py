"""``inbrainsyn transport``: parallel-transport a template ageing SVF onto a subject.

U comes from ``inbrainsyn register T1 T0`` (T0 o exp(U) ~ T1, the template ageing) and V from
``inbrainsyn register S T0`` (T0 o exp(V) ~ S); the output W is such that S o exp(W) is the
subject aged as the template aged.  All fields are ITK displacement-field images (mm, LPS) on one
grid.  A JSON sidecar (OUT with ``.json``) records method, steps, norms, time and device.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from inbrainsyn.errors import InputError, ProcessingError

# inbrainsyn.transport.METHODS, spelled out so that building the parser does not import torch
# (Testing/test_cli_common.py checks that the two agree)
METHODS = ("pole", "schild", "half-conjugation", "conjugation", "none")

SIDE_CAR_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "transport",
        help="parallel-transport a template ageing SVF onto a subject (pole ladder & co.)",
        description=(
            "Transport the template ageing SVF U (from `register T1 T0`) along the template-to-subject SVF V "
            "(from `register S T0`). The result W is such that S warped by exp(W) is the subject aged as the "
            "template aged. Methods: pole (pole ladder, BCH form, n steps), schild (Schild's ladder), "
            "half-conjugation (exp(-V/2) o exp(U) o exp(V/2), what the pole ladder converges to), conjugation "
            "(exp(-V) o exp(U) o exp(V)), none (U as is). Fields are ITK displacement-field images (mm, LPS)."
        ),
    )
    parser.add_argument("--svf", required=True, metavar="U", help="template ageing SVF (T0 o exp(U) ~ T1)")
    parser.add_argument("--along", required=True, metavar="V", help="template-to-subject SVF (T0 o exp(V) ~ S)")
    parser.add_argument("--method", choices=METHODS, default="pole", help="transport method (default pole)")
    parser.add_argument("--steps", type=int, default=None,
                        help="ladder steps for pole/schild (default: from max|V|, rungs of at most 1/2 voxel)")
    parser.add_argument("--mask", default=None,
                        help="optional subject mask on the same grid (values clamped to [0, 1], labels > 0 count "
                             "as 1); W is multiplied by it so the background stays still")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz", help="transported SVF W")
    parser.add_argument("--displacement", default=None, metavar="DISP.nii.gz",
                        help="also write the displacement to warp S by (exp(W); for the conjugations without a mask "
                             "the composed map itself, no log needed)")
    parser.set_defaults(func=run)


def sidecar_path(output: Path) -> Path:
    """``OUT.nii.gz`` -> ``OUT.json`` (beside the field)."""
    name = output.name
    for suffix in SIDE_CAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def _grid_text(grid) -> str:
    return (f"size {grid.size}, spacing {tuple(round(s, 4) for s in grid.spacing)} mm, "
            f"origin {tuple(round(o, 3) for o in grid.origin)}")


def _check_same_grid(grid_a, label_a: str, grid_b, label_b: str) -> None:
    if not grid_a.same_as(grid_b):
        raise InputError(
            f"{label_a} ({_grid_text(grid_a)}) and {label_b} ({_grid_text(grid_b)}) are not on the same grid; "
            "resample them onto one grid (e.g. the template grid) before transporting"
        )


def read_mask(path: str, grid, along_label: str) -> "torch.Tensor":
    import numpy as np
    import SimpleITK as sitk
    import torch

    """Scalar 3D mask on ``grid`` as ``(Z, Y, X)`` float weights in [0, 1]."""
    from inbrainsyn import fields, io

    image = io.read_any(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a mask must be a 3D scalar image (got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components)")
    _check_same_grid(fields.Grid.from_sitk(image), path, grid, along_label)
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    if not np.isfinite(array).all():
        raise InputError(f"{path}: mask contains NaN or infinite values")
    if not (array > 0).any():
        raise InputError(f"{path}: mask is empty (no voxel > 0); give the subject's brain mask or omit --mask")
    return torch.from_numpy(np.clip(array, 0.0, 1.0))


def max_norm_mm(field: "torch.Tensor", grid) -> float:
    import torch

    """Largest vector length of a voxel-unit field ``(3, Z, Y, X)`` in mm."""
    matrix = torch.as_tensor(grid.index_to_physical, dtype=torch.float32)
    mm = torch.einsum("ij,j...->i...", matrix, field.detach().cpu().float())
    return float(torch.sqrt((mm**2).sum(0)).max())


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    import torch

    from inbrainsyn import __version__, fields, io
    from inbrainsyn import transport as tr

    output = io.check_output_path(args.output, args.overwrite)
    displacement_path = io.check_output_path(args.displacement, args.overwrite) if args.displacement else None
    sidecar = io.check_output_path(sidecar_path(output), args.overwrite)
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be a positive integer (or omit it to choose from max|V|)")
    device = fields.resolve_device(args.device)

    u, grid_u = io.read_field(args.svf)
    v, grid_v = io.read_field(args.along)
    _check_same_grid(grid_u, args.svf, grid_v, args.along)
    mask = read_mask(args.mask, grid_v, args.along) if args.mask else None

    steps = args.steps if args.steps is not None else tr.default_steps(args.method, v)
    start = time.perf_counter()
    with torch.no_grad():
        u_dev, v_dev = u.to(device), v.to(device)
        mask_dev = mask.to(device) if mask is not None else None
        w_dev = tr.transport(u_dev, v_dev, method=args.method, steps=steps, mask=mask_dev)
        disp = None
        if displacement_path is not None:
            disp = tr.transported_displacement(u_dev, v_dev, args.method, steps, mask_dev, transported=w_dev).cpu()
        w = w_dev.cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not torch.isfinite(w).all():
        raise ProcessingError(f"{args.svf} transported along {args.along}: the result is not finite; "
                         "V is probably not a valid (non-folding) registration SVF")

    io.write_image(fields.field_to_sitk(w, grid_v), output)
    if disp is not None:
        io.write_image(fields.field_to_sitk(disp, grid_v), displacement_path)
    summary = {
        "tool": "inbrainsyn", "command": "transport", "version": __version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "inputs": {"svf": str(Path(args.svf).absolute()), "along": str(Path(args.along).absolute()),
                   "mask": str(Path(args.mask).absolute()) if args.mask else None},
        "parameters": {"method": args.method, "steps": steps},
        "max_norm_mm": {"svf": max_norm_mm(u, grid_u), "along": max_norm_mm(v, grid_v), "transported": max_norm_mm(w, grid_v)},
        "max_norm_voxels": {"svf": fields.max_norm(u), "along": fields.max_norm(v), "transported": fields.max_norm(w)},
        "timings_s": {"transport": round(seconds, 3)},
        "versions": {"torch": torch.__version__, "SimpleITK": sitk.Version_VersionString()},
        "outputs": [{"kind": "svf", "path": output.name}]
        + ([{"kind": "displacement", "path": displacement_path.name}] if displacement_path else []),
    }
    io.write_json(summary, sidecar)
    norms = summary["max_norm_mm"]
    print(
        f"transport: method={args.method} steps={steps if steps is not None else '-'} device={device} "
        f"max|U|={norms['svf']:.2f} mm max|V|={norms['along']:.2f} mm max|W|={norms['transported']:.2f} mm "
        f"time={seconds:.2f} s -> {output}"
    )
    return 0
