"""``inbrainsyn register FIXED MOVING -o DIR``: SVF registration of two 3D images.

Finds the SVF ``v`` with ``MOVING o exp(v) ~ FIXED`` and writes, on FIXED's grid:

* ``svf.nii.gz``          -- ``v`` as an ITK vector image (mm, LPS);
* ``displacement.nii.gz`` -- ``exp(v)`` as an ITK displacement field: resampling MOVING through
  ``sitk.DisplacementFieldTransform`` of it reproduces ``warped.nii.gz``;
* ``warped.nii.gz``       -- MOVING pulled back onto FIXED;
* ``manifest.json``       -- outputs, inputs, parameters, similarity, folding, time, device, versions.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from inbrainsyn.errors import InputError
from inbrainsyn.provenance import versions

OUTPUT_FILES = {"svf": "svf.nii.gz", "displacement": "displacement.nii.gz", "warped": "warped.nii.gz"}


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "register",
        help="deformable (SVF) registration of two 3D images",
        description="Find the stationary velocity field v such that MOVING warped by exp(v) matches FIXED "
        "(pull-back: warped(x) = MOVING(x + d(x)), d = exp(v)). Both are 3D scalar images (NIfTI, NRRD, MHA or a "
        "DICOM series folder); MOVING is resampled onto FIXED's grid through physical space when the grids differ "
        "(they must overlap: run an affine alignment first otherwise). Fields are written as ITK displacement-field "
        "images (3-vectors in mm, LPS).",
    )
    parser.add_argument("fixed", help="fixed (reference) image")
    parser.add_argument("moving", help="moving image, warped onto the fixed one")
    parser.add_argument("-o", "--output", required=True, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--mask", default=None, help="region of the fixed image where similarity is measured (e.g. brain mask)")
    parser.add_argument("--similarity", default="lncc", choices=["lncc", "mse"],
                        help="lncc: local normalised cross-correlation (default, robust to intensity differences); "
                        "mse: mean squared difference (same contrast)")
    parser.add_argument("--window", type=int, default=None, help="LNCC window in voxels (odd, default 5)")
    parser.add_argument("--levels", type=_int_tuple, default=None, help="pyramid shrink factors, coarse to fine (default 4,2,1)")
    parser.add_argument("--iterations", type=_int_tuple, default=None, help="largest number of iterations per level (default 200,200,20; a level stops earlier on a plateau)")
    parser.add_argument("--fast", action="store_true", help="stop the optimisation at 2 mm resolution (about 2x faster at 1 mm)")
    parser.add_argument("--smoothing", type=float, default=None,
                        help="Gaussian sigma (control-grid voxels) applied to the SVF after each update (default 0.35)")
    parser.add_argument("--symmetric", action="store_true",
                        help="forces from both images in the middle space (inverse-consistent: swapping FIXED and MOVING "
                        "negates v); about 1.7x slower and not more accurate on the battery (docs/registration.md)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the optimisation is deterministic)")
    parser.set_defaults(func=run)


def build_config(args):
    """SVFRegistrationConfig from the command-line flags (unset flags keep the defaults)."""
    from inbrainsyn.registration import SVFRegistrationConfig

    config = SVFRegistrationConfig(similarity=args.similarity, num_threads=args.threads)
    if args.window is not None:
        config.window = args.window
    if (args.levels is None) != (args.iterations is None):
        raise InputError("--levels and --iterations go together: give one iteration count per level, "
                         "e.g. --levels 4,2,1 --iterations 200,200,20")
    if args.levels is not None:
        if len(args.levels) != len(args.iterations):
            raise InputError(f"--levels {args.levels} and --iterations {args.iterations} must have the same length")
        config.levels, config.iterations = args.levels, args.iterations
        # the coarsest level's SVF lives on its image grid, finer ones on a grid 2x coarser (speed)
        config.control_factors = tuple(1 if i == 0 else 2 for i in range(len(args.levels)))
    if args.fast:
        config.min_level_spacing_mm = 2.0
    if args.smoothing is not None:
        config.diffusion_sigma = args.smoothing
    if getattr(args, "symmetric", False):
        config.symmetric = True
    try:
        config.validate()
    except ValueError as exc:
        raise InputError(f"registration options: {exc}") from None
    return config


def register_files(args, reporter) -> Path:
    """Read, register, write; returns the manifest path."""
    import time

    import SimpleITK as sitk

    from inbrainsyn import fields, io
    from inbrainsyn.registration import register_images, result_images

    started = time.perf_counter()
    io.check_output_path(Path(args.output), args.overwrite)
    config = build_config(args)
    device = fields.resolve_device(args.device)
    reporter.progress("read", 0.0, "reading images")
    fixed = io.read_image(args.fixed, f"fixed image {args.fixed}")
    moving = io.read_image(args.moving, f"moving image {args.moving}")
    mask = None
    if args.mask:
        mask = io.read_label_map(args.mask, f"mask {args.mask}")
        if not sitk.GetArrayViewFromImage(mask).any():
            raise InputError(f"mask {args.mask}: is empty (no voxel > 0); give the region where the images should match")
    read_seconds = time.perf_counter() - started

    def on_progress(fraction, message=""):
        reporter.progress("registration", 0.05 + 0.85 * float(fraction), message)

    try:
        result = register_images(fixed, moving, fixed_mask=mask, config=config, device=device, seed=args.seed,
                                 progress=on_progress, moving_name=f"moving image {args.moving}")
    except ValueError as exc:  # inputs the validation above cannot see (e.g. too small for the pyramid)
        raise InputError(f"cannot register {args.moving} to {args.fixed}: {exc}") from None

    reporter.progress("write", 0.92, "writing outputs")
    write_started = time.perf_counter()
    images = result_images(result)
    with io.staged_output_dir(args.output, args.overwrite) as staging:
        io.write_image(images["velocity"], staging / OUTPUT_FILES["svf"])
        io.write_image(images["displacement"], staging / OUTPUT_FILES["displacement"])
        io.write_image(images["warped"], staging / OUTPUT_FILES["warped"])
        manifest = {
            "tool": "inbrainsyn",
            "command": "register",
            "version": versions()["inbrainsyn"],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": result.device,
            "inputs": {
                "fixed": str(Path(args.fixed).absolute()),
                "moving": str(Path(args.moving).absolute()),
                "mask": str(Path(args.mask).absolute()) if args.mask else None,
            },
            "parameters": {**result.config, "seed": args.seed},
            "registration": {
                "convention": "warped(x) = moving(x + d(x)), d = exp(v); fields in mm (LPS) on the fixed grid",
                "similarity": result.similarity,
                "initial_similarity": result.initial_similarity,
                "similarity_name": result.similarity_name,
                "folding_fraction": result.folding_fraction,
                "min_jacobian": result.min_jacobian,
                "seconds": result.seconds,
                "registered_box": result.box,
                "iterations_run": len(result.history),
                "convergence": result.convergence,
            },
            "timings_s": {"read": read_seconds, **{f"registration_{k}": v for k, v in result.timings_s.items()},
                          "registration": result.seconds, "write": time.perf_counter() - write_started},
            "versions": versions(),
            "outputs": [{"kind": kind, "path": name} for kind, name in OUTPUT_FILES.items()],
        }
        manifest["timings_s"]["total"] = time.perf_counter() - started
        io.write_json(manifest, staging / "manifest.json")
    reporter.progress("write", 1.0, "done")
    return Path(args.output).absolute() / "manifest.json"


def run(args) -> int:
    from inbrainsyn.cli.common import make_reporter
    from inbrainsyn.progress import errors_reported

    reporter = make_reporter(args)
    with errors_reported(reporter, args.json):
        manifest_path = register_files(args, reporter)
    reporter.finish()
    if args.json:
        reporter.result(str(manifest_path))
    else:
        import json

        data = json.loads(manifest_path.read_text())
        reg = data["registration"]
        print(f"outputs: {manifest_path.parent}\nsimilarity {reg['initial_similarity']:.4f} -> {reg['similarity']:.4f} "
              f"({reg['similarity_name']}), folding {reg['folding_fraction']:.2e}, {reg['seconds']:.1f} s on {data['device']}")
    return 0
