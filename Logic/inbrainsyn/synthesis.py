"""The main job: from one T1 in its own space to future scans of the same subject.

Pipeline (InBrainSyn, Fu et al. 2025, with our registration and transport):

1. read and validate the input (any orientation, anisotropic voxels, with or without skull);
2. robust intensity normalisation (for registration only: outputs keep the input's intensities);
3. affine ``A``: template physical space -> input physical space (Mattes MI, template brain mask);
4. subject in template space ``S_t = S o A`` (on the bank grid) and template -> subject SVF ``v``
   with ``T(age) o exp(v) ~ S_t``; the template brain mask warped by ``exp(v)`` is the brain mask;
5. for each target age: the cohort's ageing SVF ``u`` (``T(age) o exp(u) ~ T(target)``, HC then AD
   after a transition) transported along ``v``: ``w = transport(u, v)``;
6. ONE composed map on the input's own grid, ``phi = A o exp(w) o A^-1``, and the input warped once by
   it (B-spline, so the image stays sharp); the atrophy map is the local volume ratio future/baseline,
   ``det D phi^-1``;
7. the subject's own regions (:mod:`inbrainsyn.anatomy`, cohort-independent: the HC template
   registered to the subject, refined by a tissue classification of the subject) give the baseline
   labels and volumes; future labels and volumes are those maps carried by ``exp(w)`` (nearest /
   partial volumes), and the template-to-subject fit is recorded (manifest, report, warning).

All outputs lie on the input's grid and geometry, so they overlay the input exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inbrainsyn import fields, io, plausibility
from inbrainsyn.errors import InputError, ProcessingError
from inbrainsyn.native import GridImage, NativeMapper, affine_parts, resample_native  # noqa: F401 (also imported from here)
from inbrainsyn.progress import Reporter
from inbrainsyn.provenance import versions

COHORTS = ("HC", "AD")
TRANSPORT_METHODS = ("pole", "schild", "conjugation", "half-conjugation", "none")

# Below this local NCC between template and subject after registration, we assume no brain was found.
MIN_BRAIN_SIMILARITY = plausibility.MIN_FIT_SIMILARITY


@dataclass
class SynthesisRequest:
    """Every user choice of one run (what the CLI and the Slicer parameter node hold)."""

    input_path: str
    age: float
    targets: list[float]
    cohort: str = "HC"
    transition_age: float | None = None
    bank: str | None = None
    transport: str = "pole"
    skull_stripped: bool = False
    device: str = "auto"
    seed: int = 0
    transport_coarsening: int = 2  # transport on a grid this many times coarser than the bank's
    pace: float = 50.0  # percentile of the cohort's atrophy rates (50 = typical; inbrainsyn.templates.pace)
    force_input: bool = False  # go on when input plausibility checks fail (outputs are marked)
    affine_threads: int = 2  # ITK threads of the affine: 2 halves its time, 1 makes runs bit-identical

    def validate(self, age_range: tuple[float, float]) -> None:
        """Check ages and choices against the bank; raise InputError with what to do."""
        lo, hi = age_range
        if self.cohort not in COHORTS:
            raise InputError(f"--cohort must be one of {', '.join(COHORTS)}, got {self.cohort!r}")
        from inbrainsyn.templates.pace import check_pace

        check_pace(self.pace)
        if self.transport not in TRANSPORT_METHODS:
            raise InputError(f"--transport must be one of {', '.join(TRANSPORT_METHODS)}, got {self.transport!r}")
        if not self.targets:
            raise InputError("give at least one target age (--targets)")
        if not (lo <= self.age <= hi):
            raise InputError(f"age {self.age:g} is outside the template bank's ages [{lo:g}, {hi:g}]")
        for target in self.targets:
            if target <= self.age:
                raise InputError(f"target age {target:g} must be above the baseline age {self.age:g}")
            if target > hi:
                raise InputError(f"target age {target:g} is beyond the template bank's last age {hi:g}")
        if self.transition_age is not None:
            if self.cohort != "HC":
                raise InputError("--transition-age describes conversion from HC to AD: use it with --cohort HC")
            if not (self.age <= self.transition_age <= max(self.targets)):
                raise InputError(
                    f"transition age {self.transition_age:g} must lie in [{self.age:g}, {max(self.targets):g}] "
                    "(between the baseline age and the last target)"
                )

    def validate_for(self, bank) -> None:
        """:meth:`validate` against ``bank``'s ages (a conversion needs the age in the HC templates too)."""
        self.validate(bank.age_range(self.cohort if self.transition_age is None else "AD"))
        if self.transition_age is not None:
            lo, hi = bank.age_range("HC")
            if not (lo <= self.age <= hi):
                raise InputError(f"age {self.age:g} is outside the HC templates' ages [{lo:g}, {hi:g}]")


# ------------------------------------------------------------------------------------------------
# Intensity
# ------------------------------------------------------------------------------------------------


def normalise_intensity(image: sitk.Image, mask: sitk.Image | None = None, low=1.0, high=99.0) -> sitk.Image:
    """Robust min-max to [0, 1]: the ``low``/``high`` percentiles of foreground voxels map to 0 and 1.

    Percentiles (not min/max) make it robust to hot voxels and to smooth bias; foreground is
    ``mask`` when given, else voxels above 10% of the 99th percentile (air excluded).
    """
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if mask is not None:
        values = array[sitk.GetArrayViewFromImage(mask) > 0]
    else:
        values = array[array > 0.1 * np.percentile(array, 99)]
    if values.size < 100:
        raise ProcessingError("intensity normalisation found almost no foreground voxels: is this a brain MRI?")
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        raise ProcessingError("intensity normalisation: the image has no contrast in its foreground")
    out = np.clip((array - lo) / (hi - lo), 0.0, 1.5).astype(np.float32)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class SubjectInTemplateSpace:
    """What the pipeline knows of the subject after registration (all on the bank grid)."""

    affine_matrix: np.ndarray  # A: template mm -> input mm, A(p) = M p + t
    affine_offset: np.ndarray
    image: torch.Tensor  # normalised subject resampled on the bank grid, (Z, Y, X)
    velocity: torch.Tensor  # v: T(age) o exp(v) ~ image, (3, Z, Y, X) voxel units
    displacement: torch.Tensor  # exp(v)
    similarity: float
    folding_fraction: float
    support: torch.Tensor | None = None  # registration mask (the template's dilated brain mask), (Z, Y, X)


@dataclass
class TargetResult:
    age: float
    velocity: torch.Tensor  # w, transported ageing in template space
    displacement: torch.Tensor  # exp(w)


def dilate_mask(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    radius = [max(1, int(round(radius_mm / s))) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(sitk.Cast(mask > 0, sitk.sitkUInt8), radius)


def register_subject(
    subject: sitk.Image,
    request: SynthesisRequest,
    bank,
    device: torch.device,
    reporter: Reporter,
) -> SubjectInTemplateSpace:
    """Affine then SVF registration of the bank template at the subject's age onto the subject."""
    from inbrainsyn.anatomy import reference_cohort
    from inbrainsyn.registration import AffineConfig, affine_register

    template = bank.template(request.cohort, request.age)
    # the affine aligns to the cohort-independent reference, so the subject's own volumes do not depend on the cohort
    reference = bank.template(reference_cohort(bank.cohorts), request.age)
    brain_mask = bank.mask
    reporter.progress("affine", 0.10, "affine alignment to the template")
    normalised = normalise_intensity(subject)
    # The template's (dilated) brain mask restricts the metric to the brain, so skull and neck in
    # the input do not pull the alignment.
    # Two ITK threads halve the affine's time; results then differ between runs by ~1e-5 mm
    # (ITK's threaded metric sums), far below what the SVF registration resolves (on the tiny
    # test bank of test_batch.py up to 0.2 mm). affine_threads=1 makes runs bit-identical.
    transform = affine_register(
        reference, normalised, fixed_mask=dilate_mask(brain_mask, 10.0), config=AffineConfig(threads=request.affine_threads),
        seed=request.seed
    )
    matrix, offset = affine_parts(transform)
    # a cropped scan is refused here, in seconds, before the SVF registration
    plausibility.enforce([plausibility.coverage_after_affine(subject, bank, matrix, offset)], request.force_input)

    grid = bank.grid
    in_template = sitk.Resample(normalised, grid.reference_image(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed = fields.image_to_tensor(in_template)
    moving = fields.image_to_tensor(template)
    support = fields.image_to_tensor(sitk.Cast(dilate_mask(brain_mask, 6.0), sitk.sitkFloat32))
    if not request.skull_stripped:
        # Registration sees the brain only: outside the template's dilated mask the subject's
        # skull and scalp are not modelled by the (skull-stripped) template.
        fixed = fixed * support
    fixed = fixed.clamp(0, 1)

    reporter.progress("registration", 0.20, "template to subject SVF registration")

    def on_progress(fraction, message=""):
        reporter.progress("registration", 0.20 + 0.35 * float(fraction), message or "registering")

    result = template_to_subject_svf(fixed, moving, support, grid, request, device, on_progress)
    return SubjectInTemplateSpace(
        affine_matrix=matrix,
        affine_offset=offset,
        image=fixed,
        velocity=result.velocity.detach().cpu(),
        displacement=result.displacement.detach().cpu(),
        similarity=float(result.similarity),
        folding_fraction=float(result.folding_fraction),
        support=support,
    )


def template_to_subject_svf(fixed, moving, support, grid, request: SynthesisRequest, device, progress=None):
    """The template-to-subject SVF registration: one place, so every template is registered alike."""
    from inbrainsyn.registration import register_svf

    return register_svf(fixed, moving, spacing=grid.spacing, mask=support, device=device, seed=request.seed, progress=progress)


def subject_anatomy(registered: SubjectInTemplateSpace, request: SynthesisRequest, bank, device, reporter: Reporter):
    """The subject's own baseline regions (:mod:`inbrainsyn.anatomy`), independent of the cohort: the
    reference (HC) template at the subject's age registered to the subject -- the run's own
    registration in HC runs, one more registration otherwise -- refined by the subject's intensities."""
    from inbrainsyn import anatomy

    reference = anatomy.reference_cohort(bank.cohorts)
    displacement = registered.displacement
    if reference != request.cohort:
        reporter.progress("anatomy", 0.56, f"registering the {reference} template for the subject's own volumes")
        displacement = template_to_subject_svf(registered.image, bank.template_tensor(reference, request.age),
                                               registered.support, bank.grid, request, device).displacement
    reporter.progress("anatomy", 0.57, "the subject's own regions (tissue classification)")
    return anatomy.subject_anatomy(registered.image, bank.labels_tensor(reference, request.age), displacement,
                                   bank.label_names, bank.spacing_zyx,
                                   reference_image=bank.template_tensor(reference, request.age))


def _warn(reporter: Reporter, message: str) -> None:
    """A warning for the user: the reporter's stream (JSON event / stderr bar), stderr when silent."""
    import sys

    reporter.log(message, level="warning")
    if type(reporter) is Reporter:
        print(f"warning: {message}", file=sys.stderr)


def cohort_ageing_svf(bank, cohort: str, age: float, target: float, transition_age: float | None) -> torch.Tensor:
    """Template ageing ``u`` from ``age`` to ``target``: the cohort's, or HC then AD after a conversion."""
    if transition_age is not None and target > transition_age:
        return bank.ageing_svf("AD", age, target, transition_age=transition_age)
    return bank.ageing_svf(cohort, age, target)


def coarse_shape(shape: tuple[int, int, int], factor: int) -> tuple[int, int, int]:
    """Grid shape ``factor`` times coarser sharing the corner voxel centres (``align_corners``)."""
    return tuple(max(2, (n - 1) // factor + 1) for n in shape)


def transport_on_coarse_grid(u: torch.Tensor, v: torch.Tensor, method: str, factor: int) -> torch.Tensor:
    """Transport on a grid ``factor`` times coarser, then back to the full grid.

    Both SVFs are smooth on the scale of a few voxels, so the ladder loses little on a coarser grid
    while its cost falls by ``factor^4`` (``factor^3`` voxels, ``factor`` times fewer rungs since |v|
    in voxels shrinks).  The reference code runs its ladder the same way (half resolution).
    """
    from inbrainsyn.transport import transport

    if factor <= 1 or method == "none":
        return transport(u, along=v, method=method)
    small = coarse_shape(tuple(u.shape[1:]), factor)
    w_small = transport(fields.resize_field(u, small), along=fields.resize_field(v, small), method=method)
    return fields.resize_field(w_small, tuple(u.shape[1:]))


def transported_ageing(subject: SubjectInTemplateSpace, request: SynthesisRequest, bank, device) -> list[TargetResult]:
    """For each target age: the cohort ageing ``u`` transported along ``v`` and its exponential."""
    from inbrainsyn.templates.pace import bank_pace_sigma, pace_factor
    from inbrainsyn.transport import fade_outside

    v = subject.velocity.to(device)
    # the subject's head in template space: nothing moves outside it (skull, scalp, box edges)
    head = fade_outside(fields.warp(fields.image_to_tensor(bank.mask), subject.displacement) > 0.5, bank.spacing_zyx)
    factor = pace_factor(request.pace, bank_pace_sigma(bank))  # slow / typical / fast ageing: exp(m u)
    results = []
    for target in request.targets:
        u = factor * cohort_ageing_svf(bank, request.cohort, request.age, target, request.transition_age).to(device)
        w = transport_on_coarse_grid(u, v, request.transport, request.transport_coarsening) * head.to(device)
        results.append(TargetResult(age=float(target), velocity=w.cpu(), displacement=fields.accurate_exp(w).cpu()))
    return results


def _image_like(array: np.ndarray, reference: sitk.Image, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """A numpy ``(Z, Y, X)`` array as an image on ``reference``'s grid; integer types are rounded."""
    array = np.asarray(array, dtype=np.float32)
    if pixel_type != sitk.sitkFloat32:
        array = np.rint(array)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return sitk.Cast(image, pixel_type)


def age_tag(age: float) -> str:
    return f"age{age:05.1f}"


def run_synthesis(request: SynthesisRequest, outdir: str | Path, overwrite: bool = False, reporter: Reporter | None = None) -> Path:
    """Run the whole job and write every output into ``outdir`` (atomically); returns manifest.json's path.

    ``outdir`` is claimed exclusively from the start (a second run into it fails at once) and
    published by one rename when everything is written (io.OutputClaim).
    """
    with io.claim_output_dir(outdir, overwrite) as claim:
        return _run_claimed(request, claim, reporter)


def _run_claimed(request: SynthesisRequest, claim: io.OutputClaim, reporter: Reporter | None) -> Path:
    reporter = reporter or Reporter()
    started = time.perf_counter()
    outdir = claim.outdir
    reporter.progress("read", 0.0, "reading the input")
    subject = io.read_image(request.input_path, name=str(request.input_path))

    from inbrainsyn import anatomy
    from inbrainsyn import report as report_mod
    from inbrainsyn.templates import load_bank

    bank = load_bank(request.bank)
    request.validate_for(bank)
    device = fields.resolve_device(request.device)
    torch.manual_seed(request.seed)

    registered = register_subject(subject, request, bank, device, reporter)
    template_labels = bank.labels_tensor(request.cohort, request.age).float()  # template labels at the baseline age
    checks = plausibility.enforce(plausibility.check_registered(subject, registered, bank, template_labels),
                                  request.force_input, reporter)
    own = subject_anatomy(registered, request, bank, device, reporter)  # the subject's own regions (bank grid)
    native_scale = abs(float(np.linalg.det(registered.affine_matrix)))  # template mm^3 -> input mm^3
    fit = anatomy.record_fit(own, registered.image, bank.template_tensor(request.cohort, request.age),
                             template_labels, registered.velocity, registered.displacement, bank.spacing_zyx, native_scale,
                             bank.labels_tensor(anatomy.reference_cohort(bank.cohorts), request.age).float())
    if fit.beyond_registration:
        _warn(reporter, fit.warning())
    reporter.progress("transport", 0.58, f"transporting the {request.cohort} ageing ({request.transport})")
    targets = transported_ageing(registered, request, bank, device)

    native_grid = fields.Grid.from_sitk(subject)
    mapper = NativeMapper(native_grid, bank.grid, registered.affine_matrix, registered.affine_offset, device)
    labels_t = own.hard_labels().float()  # the subject's own baseline labels (bank grid, subject space)
    mask_t = fields.image_to_tensor(bank.mask)
    label_names = bank.label_names
    cohort_of = lambda age: (  # noqa: E731 - the cohort shown for an age: AD after a conversion
        "AD" if request.transition_age is not None and age > request.transition_age else request.cohort
    )

    outputs: list[dict] = []
    volumes: list[dict] = []
    with claim.staging() as stage:
        reporter.progress("outputs", 0.70, "writing the baseline")
        io.write_image(subject, stage / "baseline.nii.gz")
        outputs.append({"kind": "baseline", "age": request.age, "cohort": request.cohort, "path": "baseline.nii.gz"})
        baseline_labels = _image_like(mapper.pull_template(labels_t, None), subject, sitk.sitkInt16)
        brain_mask = _image_like(mapper.pull_template(mask_t, registered.displacement) > 0.5, subject, sitk.sitkUInt8)
        io.write_image(baseline_labels, stage / f"labels_{age_tag(request.age)}.nii.gz")
        io.write_image(brain_mask, stage / "brain_mask.nii.gz")
        outputs.append({"kind": "labels", "age": request.age, "cohort": request.cohort, "path": f"labels_{age_tag(request.age)}.nii.gz"})
        outputs.append({"kind": "mask", "age": request.age, "cohort": request.cohort, "path": "brain_mask.nii.gz"})

        def volumes_at(age, cohort, template_displacement):
            """Regional volumes (mL): the subject's own partial-volume maps, carried by the synthesis
            deformation for a target age (so the synthetic image and its volumes agree)."""
            return {"age": age, "cohort": cohort, **own.volumes_ml(template_displacement, native_scale)}

        volumes.append(volumes_at(request.age, request.cohort, None))

        subject_array = sitk.GetArrayViewFromImage(subject)
        low, high = float(subject_array.min()), float(subject_array.max())
        subject_spline = GridImage(subject, device, "bspline")  # B-spline coefficients, once for every target
        for i, target in enumerate(targets):
            tag = age_tag(target.age)
            cohort = cohort_of(target.age)
            reporter.progress("outputs", 0.70 + 0.25 * i / len(targets), f"age {target.age:g}: warping the input once")
            warped = np.clip(mapper.warp_native(subject_spline, target.displacement), low, high)  # B-spline overshoot
            synthetic, difference = _image_like(warped, subject), _image_like(warped - subject_array, subject)
            inverse = fields.accurate_exp(-target.velocity)
            jacobian = _image_like(mapper.pull_template(fields.jacobian_determinant(inverse), None, "bilinear", fill=1.0), subject)
            labels = _image_like(mapper.pull_template(labels_t, target.displacement), subject, sitk.sitkInt16)
            for kind, image in (("synthetic", synthetic), ("difference", difference), ("jacobian", jacobian), ("labels", labels)):
                name = f"{kind}_{tag}.nii.gz"
                io.write_image(image, stage / name)
                outputs.append({"kind": kind, "age": target.age, "cohort": cohort, "path": name})
            volumes.append(volumes_at(target.age, cohort, target.displacement))

        reporter.progress("report", 0.95, "volumes and report")
        report_mod.write_volumes_csv(volumes, stage / "volumes.csv")
        outputs.append({"kind": "volumes", "path": "volumes.csv"})
        report_mod.write_report(stage, outputs, volumes, stage / "report.png",
                                title=_title(request) + plausibility.report_note(checks, request.force_input), notes=fit.lines())
        outputs.append({"kind": "report", "path": "report.png"})
        timings = reporter.finish()
        manifest = {
            "tool": "inbrainsyn",
            "command": "synthesize",
            "version": versions()["inbrainsyn"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": str(device),
            "inputs": {
                "image": str(Path(request.input_path).absolute()),
                "age": request.age,
                "cohort": request.cohort,
                "transition_age": request.transition_age,
                "targets": [float(t) for t in request.targets],
                "pace": request.pace,
            },
            "parameters": {**asdict(request), "bank": bank.describe() if hasattr(bank, "describe") else str(request.bank)},
            "diagnostics": {
                "template_to_subject_similarity": registered.similarity,
                "template_to_subject_folding_fraction": registered.folding_fraction,
                "affine_matrix": registered.affine_matrix.tolist(),
                "affine_offset": registered.affine_offset.tolist(),
                "template_to_subject_fit": fit.to_json(),
                "beyond_registration": fit.beyond_registration,
                "subject_anatomy": {**own.summary(), "reference_cohort": anatomy.reference_cohort(bank.cohorts)},
            },
            "input_checks": plausibility.manifest_entry(checks, request.force_input),
            "timings_s": {**{k: round(v, 3) for k, v in timings.items()}, "total": round(time.perf_counter() - started, 3)},
            "versions": versions(),
            "outputs": outputs,
            "labels": {str(k): v for k, v in label_names.items()},
        }
        io.write_json(manifest, stage / "manifest.json")
    manifest_path = Path(outdir).absolute() / "manifest.json"
    reporter.result(str(manifest_path))
    return manifest_path


def _title(request: SynthesisRequest) -> str:
    conversion = f", HC->AD at {request.transition_age:g}" if request.transition_age is not None else ""
    return (
        f"InBrainSyn: {Path(request.input_path).name}, age {request.age:g}, {request.cohort}{conversion}, "
        f"transport {request.transport}, pace P{request.pace:g}"
    )
