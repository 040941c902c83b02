"""The subject's own anatomy: cohort-independent baseline regions refined by the subject's intensities.

Why: the regional volumes a run reports must belong to the *subject*, not to the scenario the user
picks.  Carrying the chosen cohort's template labels by the template-to-subject SVF ``v`` makes the
same scan's baseline depend on the cohort (an AD template has larger ventricles, and ``v`` never
captures the whole difference), and makes every volume only as good as ``v``.

Method (all on the bank grid, in the subject's affinely aligned space ``S_t = S o A``)
-------------------------------------------------------------------------------------
1. **Reference registration.**  One template independent of the cohort -- the bank's HC template at
   the subject's age (:func:`reference_cohort`) -- is registered to ``S_t``: ``T_ref o exp(v_ref) ~ S_t``.
   An HC run reuses its own registration (``v_ref = v``); an AD run registers once more.
2. **Registered priors.**  The reference labels' one-hot maps, pulled back trilinearly,
   ``m_l = 1_l o exp(v_ref)`` ``(R, Z, Y, X)``, give tissue priors ``P_k`` for ``k`` in
   (other, CSF, GM, WM): ``P_tissue = G_s * sum_{l in k} m_l`` (Gaussian ``s`` = :attr:`AnatomyConfig.prior_sigma_mm`
   for residual misregistration), mixed with a floor ``eps`` spread over the tissue classes inside the
   intracranial volume so that the subject may hold CSF where the template has tissue (a ventricle
   larger than the registration could reach), and ``P_other = 1 - sum P_tissue``.
3. **Tissue classification** (unified segmentation in the spirit of SPM / FSL FAST / ANTs Atropos):
   intensities ``y(x)`` are modelled as ``y = b(x) t(x)``, ``t | k ~ N(mu_k, sigma_k^2)`` for the tissues
   and a flat density ``1 / range(y)`` for "other" (skull, scalp, air).  EM with a mean-field Potts
   (MRF) term::

       log q_k(x) = log P_k(x) + log N(y(x) / b(x); mu_k, sigma_k) + beta * mean_{n in N(x)} q_k(n) + const

       mu_k = sum q_k y/b / sum q_k,      sigma_k^2 = sum q_k (y/b - mu_k)^2 / sum q_k
       b = G_B * (sum_k q_k y mu_k / sigma_k^2) / G_B * (sum_k q_k mu_k^2 / sigma_k^2)      (tissues only)

   ``b`` is the weighted least-squares smooth multiplicative bias (normalised convolution with a
   Gaussian of :attr:`AnatomyConfig.bias_sigma_mm`).  The EM runs on a 2x coarser grid (cheap); one
   final E-step with the MRF runs on the full bank grid.
4. **Regions.**  Each label ``l`` of tissue class ``c(l)`` gets the partial-volume map
   ``p_l = q_{c(l)} * m_l / sum_{l' in c(l)} m_l'``: the subject's tissue decides *how much* GM / WM / CSF a
   voxel holds, the registered labels decide *which* structure of that tissue it belongs to.  Where the
   registered labels hold none of class ``c`` (``sum < 0.05``: e.g. CSF of a ventricle larger than the
   registered one), the within-class shares of the nearest voxel that has some are used (Euclidean
   distance transform).  So ventricles grow into CSF the registration did not reach, and a
   hippocampus whose template was registered too large loses the voxels that the subject shows as CSF.

Future volumes carry the subject's maps by the synthesis deformation: ``p_l o exp(w)`` for the target
ageing ``w`` (the same map that makes the synthetic image), scaled by ``|det A|`` to the input's mm^3.

Fit record (:func:`fit_record`): similarity before / after registration, folding, how far the subject
is from the template (``|v|`` in mm, spread of ``log det D exp(v)``) and the *residual*: the volume
the run's registration gives each region (cohort template labels carried by ``v``) against the
subject's own (``p_l``).  A residual beyond :data:`CAPTURE_LIMITS` means the ageing, which is placed
where the registered template's structures are, does not land on the subject's own structures: the
run flags it (measurements in docs/anatomy.md).

Shapes: images ``(Z, Y, X)``, maps ``(C, Z, Y, X)``, displacements ``(3, Z, Y, X)`` in voxel units
(:mod:`inbrainsyn.fields`).  Data flow: this module sits above registration / templates and below
synthesis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from inbrainsyn import fields
from inbrainsyn.templates.regions import FLUID_LABEL_NAMES, summary_volumes_from_maps

CLASSES = ("other", "csf", "gm", "wm")  # index 0: everything outside the intracranial volume
REFERENCE_COHORT = "HC"
# A region whose registration-only volume differs from the subject's own by more than this (relative)
# is one the registration did not capture (calibrated in docs/anatomy.md).
CAPTURE_LIMITS = {"ventricles": 0.20, "hippocampus": 0.20, "amygdala": 0.25}
MIN_CAPTURE_SIMILARITY = 0.30  # mean squared LNCC after registration below this: poor fit
# A structure whose local similarity after registration (LNCC^2 around it) falls below this fraction
# of the whole brain's was not matched: e.g. a hippocampus much smaller than the template's, which the
# tissue classes cannot reveal because neighbouring grey matter fills the space (docs/anatomy.md).
MIN_REGIONAL_SIMILARITY_RATIO = 0.90
# The subject's own volume of a structure as a fraction of the reference template's at the subject's
# age: (lowest, highest) ratio on which the reported volumes were validated (within their targets) on
# varied-anatomy phantom subjects; a subject outside it lies beyond what the registration was shown to
# capture.  Calibrated by benchmarks/calibrate_fit_flag.py on training seeds (docs/anatomy.md): the
# smallest validated ratios were 0.57 (hippocampus) and 0.47 (amygdala), every error within 6.5 %.
CAPTURE_RATIO_LIMITS = {"hippocampus": (0.55, None), "amygdala": (0.45, None)}
REGIONAL_FIT = {"ventricles": "lateral_ventricles", "hippocampus": "hippocampus", "amygdala": "amygdala"}


@dataclass
class AnatomyConfig:
    """Parameters of :func:`subject_anatomy` (chosen on training phantoms, docs/anatomy.md)."""

    use_intensities: bool = True  # False: registered labels only (the previous behaviour, for comparison)
    relative: bool = True  # refine by the subject's tissue minus the registered template's (step 4b)
    prior_sigma_mm: float = 3.0  # smoothing of the registered tissue maps (residual misregistration)
    prior_floor: float = 0.05  # prior mass spread evenly over the tissues inside the intracranial volume
    bias_sigma_mm: float = 30.0  # smoothness of the multiplicative bias field
    mrf_beta: float = 1.0  # weight of the mean-field Potts term (fraction of neighbours agreeing)
    partial_volume_weight: float = 0.0  # prior weight of a CSF/WM partial-volume class (0: none; docs/anatomy.md)
    em_iterations: int = 12
    full_mrf_iterations: int = 2
    min_sigma: float = 0.01  # floor of the class standard deviations (normalised intensity)


def reference_cohort(cohorts) -> str:
    """The cohort whose template is the reference anatomy: HC when the bank has it."""
    cohorts = tuple(cohorts)
    return REFERENCE_COHORT if REFERENCE_COHORT in cohorts else cohorts[0]


def tissue_of(name: str) -> str:
    """Tissue class of a label name: fluid labels are CSF, ``*wm*`` WM, anything else GM."""
    if name in FLUID_LABEL_NAMES:
        return "csf"
    return "wm" if "wm" in name.lower() or "white" in name.lower() else "gm"


def registered_label_maps(labels: torch.Tensor, values: list[int], displacement: torch.Tensor | None) -> torch.Tensor:
    """One-hot maps of ``labels`` ``(Z, Y, X)`` for ``values``, pulled back trilinearly by
    ``id + displacement`` (``None``: not moved): ``(R, Z, Y, X)`` partial volumes."""
    maps = torch.stack([(labels == int(v)).float() for v in values])
    return maps if displacement is None else fields.warp(maps, displacement.float()).clamp(0.0, 1.0)


def _gauss(array: np.ndarray, sigma_mm: float, spacing_zyx) -> np.ndarray:
    return ndi.gaussian_filter(array, [sigma_mm / s for s in spacing_zyx], mode="nearest", truncate=3.0)


def tissue_priors(label_maps: torch.Tensor, tissues: list[str], spacing_zyx, config: AnatomyConfig) -> torch.Tensor:
    """Priors ``(4, Z, Y, X)`` for :data:`CLASSES` from registered label maps (step 2 of the module doc)."""
    out = []
    for name in CLASSES[1:]:
        members = [i for i, t in enumerate(tissues) if t == name]
        total = label_maps[members].sum(0).numpy() if members else np.zeros(label_maps.shape[1:], np.float32)
        out.append(_gauss(total.astype(np.float32), config.prior_sigma_mm, spacing_zyx))
    tissue = np.clip(np.stack(out), 0.0, 1.0)
    inside = np.clip(tissue.sum(0), 0.0, 1.0)
    tissue = (1.0 - config.prior_floor) * tissue + config.prior_floor * inside / 3.0
    other = np.clip(1.0 - tissue.sum(0), 0.0, 1.0)
    priors = torch.from_numpy(np.concatenate([other[None], tissue]).astype(np.float32))
    return priors / priors.sum(0, keepdim=True).clamp_min(1e-6)


@dataclass
class TissueClassification:
    """Result of :func:`classify_tissues`: posteriors ``(4, Z, Y, X)`` for :data:`CLASSES` and the model."""

    posteriors: torch.Tensor
    means: list[float]
    sigmas: list[float]
    bias: torch.Tensor  # (Z, Y, X), mean 1 in the brain
    iterations: int


def _neighbour_mean(q: torch.Tensor) -> torch.Tensor:
    """Mean of each map over the 3x3x3 neighbourhood (the voxel itself excluded): ``(K, Z, Y, X)``."""
    total = F.avg_pool3d(q.unsqueeze(0), 3, stride=1, padding=1, count_include_pad=False)[0]
    return (total * 27.0 - q) / 26.0


def _log_likelihood(y: torch.Tensor, means, sigmas, log_flat: float, partial_volume: bool) -> torch.Tensor:
    """``(4 or 5, Z, Y, X)``: other (flat), CSF, GM, WM and optionally the CSF/WM partial-volume class."""
    means, sigmas = list(means), list(sigmas)
    if partial_volume:  # a voxel half CSF half WM (+- 25 %): mean midway, spread of the uniform mixing
        means.append(0.5 * (means[0] + means[2]))
        sigmas.append(math.sqrt(0.25 * (sigmas[0] ** 2 + sigmas[2] ** 2) + (means[2] - means[0]) ** 2 / 48.0))
    rows = [torch.full_like(y, log_flat)]
    for mu, sd in zip(means, sigmas):
        rows.append(-0.5 * ((y - mu) / sd) ** 2 - math.log(sd * math.sqrt(2.0 * math.pi)))
    return torch.stack(rows)


def _fold(q: torch.Tensor) -> torch.Tensor:
    """Pure posteriors ``(4 or 5, ...)`` -> tissue fractions ``(4, ...)``: a CSF/WM voxel is half of each."""
    if q.shape[0] == 4:
        return q
    out = q[:4].clone()
    out[1] += 0.5 * q[4]
    out[3] += 0.5 * q[4]
    return out


def _e_step(y, log_prior, means, sigmas, log_flat, beta, mrf_iterations, start=None):
    """Pure-class posteriors ``(K, Z, Y, X)`` (``K`` = rows of ``log_prior``): prior x likelihood, then
    ``mrf_iterations`` mean-field Potts sweeps on the tissue fractions."""
    base = log_prior + _log_likelihood(y, means, sigmas, log_flat, log_prior.shape[0] == 5)
    q = torch.softmax(base, 0) if start is None else start
    for _ in range(mrf_iterations):
        neighbours = _neighbour_mean(_fold(q))
        if q.shape[0] == 5:
            neighbours = torch.cat([neighbours, 0.5 * (neighbours[1:2] + neighbours[3:4])])
        q = torch.softmax(base + beta * neighbours, 0)
    return q


def _with_partial_volume(priors: torch.Tensor, weight: float) -> torch.Tensor:
    """Append the CSF/WM partial-volume prior ``weight * sqrt(P_csf P_wm)`` (only where both are plausible)."""
    if weight <= 0:
        return priors
    pv = weight * torch.sqrt(priors[1] * priors[3])
    out = torch.cat([priors, pv[None]])
    return out / out.sum(0, keepdim=True).clamp_min(1e-6)


def _bias(y: np.ndarray, q: np.ndarray, means, sigmas, sigma_mm: float, spacing_zyx) -> np.ndarray:
    num = np.zeros_like(y)
    den = np.zeros_like(y)
    for k, (mu, sd) in enumerate(zip(means, sigmas), start=1):
        w = q[k] / (sd * sd)
        num += w * y * mu
        den += w * mu * mu
    num, den = _gauss(num, sigma_mm, spacing_zyx), _gauss(den, sigma_mm, spacing_zyx)
    scale = np.where(den > 1e-6 * den.max(), num / np.maximum(den, 1e-12), 1.0)
    brain = q[1:4].sum(0)
    return scale / max(float((scale * brain).sum() / max(brain.sum(), 1e-6)), 1e-6)


def classify_tissues(image: torch.Tensor, priors: torch.Tensor, spacing_zyx, config: AnatomyConfig | None = None) -> TissueClassification:
    """EM tissue classification with bias correction and an MRF (step 3 of the module doc).

    image: ``(Z, Y, X)`` normalised intensities (about [0, 1], air 0); priors: ``(4, Z, Y, X)``.
    The model is fitted on a 2x coarser grid; posteriors are returned on the image's grid.
    """
    config = config or AnatomyConfig()
    y_full = image.float().clamp_min(0.0)
    y = F.avg_pool3d(y_full[None, None], 2, ceil_mode=False)[0, 0] if min(y_full.shape) >= 8 else y_full
    priors = _with_partial_volume(priors, config.partial_volume_weight)
    p = F.avg_pool3d(priors[None], 2)[0] if y is not y_full else priors
    coarse_spacing = tuple(2.0 * s for s in spacing_zyx) if y is not y_full else tuple(spacing_zyx)
    log_prior = torch.log(p.clamp_min(1e-6))
    log_flat = -math.log(max(float(y_full.max()), 1e-3))
    # initial class statistics from the prior-weighted intensities
    means, sigmas = [], []
    for k in range(1, 4):
        w = p[k]
        mu = float((w * y).sum() / w.sum().clamp_min(1e-6))
        sd = math.sqrt(float((w * (y - mu) ** 2).sum() / w.sum().clamp_min(1e-6)))
        means.append(mu)
        sigmas.append(max(sd, config.min_sigma))
    bias = np.ones(tuple(y.shape), np.float32)
    q = None
    for _ in range(config.em_iterations):
        corrected = y / torch.from_numpy(bias).clamp_min(0.2)
        q = _e_step(corrected, log_prior, means, sigmas, log_flat, config.mrf_beta, 1, q)
        for k in range(1, 4):
            w = q[k]
            total = float(w.sum())
            if total < 1.0:
                continue
            means[k - 1] = float((w * corrected).sum()) / total
            sigmas[k - 1] = max(math.sqrt(float((w * (corrected - means[k - 1]) ** 2).sum()) / total), config.min_sigma)
        bias = _bias(y.numpy(), q.numpy(), means, sigmas, config.bias_sigma_mm, coarse_spacing).astype(np.float32)
    bias_full = torch.from_numpy(bias)
    if y is not y_full:
        bias_full = F.interpolate(bias_full[None, None], size=tuple(y_full.shape), mode="trilinear", align_corners=False)[0, 0]
    corrected = y_full / bias_full.clamp_min(0.2)
    posteriors = _fold(_e_step(corrected, torch.log(priors.clamp_min(1e-6)), means, sigmas, log_flat, config.mrf_beta,
                               config.full_mrf_iterations))
    return TissueClassification(posteriors=posteriors, means=means, sigmas=sigmas, bias=bias_full,
                                iterations=config.em_iterations)


def within_class_shares(label_maps: torch.Tensor, tissues: list[str], spacing_zyx, threshold: float = 0.05) -> torch.Tensor:
    """``m_l / sum_{l' in c(l)} m_l'`` ``(R, Z, Y, X)``, extended to the nearest voxel where the class is absent."""
    shares = torch.zeros_like(label_maps)
    for name in CLASSES[1:]:
        members = [i for i, t in enumerate(tissues) if t == name]
        if not members:
            continue
        total = label_maps[members].sum(0)
        present = (total >= threshold).numpy()
        part = label_maps[members] / total.clamp_min(threshold)
        if present.any() and not present.all():
            nearest = ndi.distance_transform_edt(~present, sampling=spacing_zyx, return_distances=False, return_indices=True)
            part = part[(slice(None), *[torch.from_numpy(i) for i in nearest])]
        elif not present.any():
            part = torch.full_like(part, 1.0 / len(members))
        shares[members] = part / part.sum(0, keepdim=True).clamp_min(1e-6)
    return shares


@dataclass
class SubjectAnatomy:
    """The subject's baseline regions on the bank grid (the affinely aligned subject ``S_t``).

    maps: ``(R, Z, Y, X)`` partial volumes of the label ``values`` (sum <= 1; the rest is outside the brain).
    registered: ``(R, Z, Y, X)`` the reference labels carried by ``v_ref`` (before the intensity refinement).
    tissue: the classification (None when ``use_intensities`` is off).
    """

    values: list[int]
    label_names: dict[int, str]
    maps: torch.Tensor
    registered: torch.Tensor
    tissue: TissueClassification | None
    voxel_ml: float
    seconds: float = 0.0

    def volumes_ml(self, displacement: torch.Tensor | None = None, scale: float = 1.0) -> dict[str, float]:
        """Summary-region volumes (mL) of the maps, carried by ``id + displacement`` when given
        (future volumes: ``p_l o exp(w)``), times ``scale`` (``|det A|``: bank mm^3 -> input mm^3)."""
        maps = self.maps if displacement is None else fields.warp(self.maps, displacement.float())
        volumes = summary_volumes_from_maps(maps, self.values, self.label_names, self.voxel_ml)
        return {k: v * scale for k, v in volumes.items()}

    def hard_labels(self, threshold: float = 0.5) -> torch.Tensor:
        """Label map ``(Z, Y, X)`` int16: the largest map where the maps sum to at least ``threshold``."""
        lookup = torch.tensor([int(v) for v in self.values], dtype=torch.int16)
        labels = lookup[self.maps.argmax(0)]
        labels[self.maps.sum(0) < threshold] = 0
        return labels

    def summary(self) -> dict:
        out = {"method": "registered HC-template labels refined by an EM tissue classification"
               if self.tissue is not None else "registered HC-template labels", "seconds": round(self.seconds, 3)}
        if self.tissue is not None:
            out["tissue_means"] = dict(zip(CLASSES[1:], [round(m, 4) for m in self.tissue.means]))
            out["tissue_sigmas"] = dict(zip(CLASSES[1:], [round(s, 4) for s in self.tissue.sigmas]))
            brain = self.tissue.posteriors[1:].sum(0) > 0.5
            bias = self.tissue.bias[brain]
            if bias.numel():
                out["bias_range"] = [round(float(bias.min()), 3), round(float(bias.max()), 3)]
        return out


def subject_anatomy(image: torch.Tensor, reference_labels: torch.Tensor, displacement: torch.Tensor | None,
                    label_names: dict[int, str], spacing_zyx, config: AnatomyConfig | None = None,
                    reference_image: torch.Tensor | None = None) -> SubjectAnatomy:
    """The subject's baseline regions (module doc, steps 2-4).

    image: ``(Z, Y, X)`` the subject on the bank grid (normalised intensities);
    reference_labels: ``(Z, Y, X)`` integer labels of the reference template; displacement:
    ``exp(v_ref)`` ``(3, Z, Y, X)`` voxel units; spacing_zyx: bank voxel size (mm) along (Z, Y, X);
    reference_image: ``(Z, Y, X)`` the reference template's intensities; when given (and
    ``config.relative``), the refinement is relative (step 4b of the module doc).
    """
    import time

    started = time.perf_counter()
    config = config or AnatomyConfig()
    values = sorted(int(v) for v in label_names)
    tissues = [tissue_of(label_names[v]) for v in values]
    registered = registered_label_maps(reference_labels, values, displacement)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    if not config.use_intensities:
        return SubjectAnatomy(values, dict(label_names), registered, registered, None, voxel_ml,
                              time.perf_counter() - started)
    priors = tissue_priors(registered, tissues, spacing_zyx, config)
    tissue = classify_tissues(image, priors, spacing_zyx, config)
    shares = within_class_shares(registered, tissues, spacing_zyx)
    index = torch.tensor([CLASSES.index(t) for t in tissues])
    if reference_image is not None and config.relative:
        moved = reference_image.float() if displacement is None else fields.warp(reference_image.float(), displacement.float())
        reference_tissue = classify_tissues(moved, priors, spacing_zyx, config)
        delta = tissue.posteriors[index] - reference_tissue.posteriors[index]
        maps = (registered + delta * shares).clamp(0.0, 1.0)
        maps = maps / maps.sum(0, keepdim=True).clamp_min(1.0)
    else:
        maps = tissue.posteriors[index] * shares
    return SubjectAnatomy(values, dict(label_names), maps, registered, tissue, voxel_ml, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------
# Fit record
# ------------------------------------------------------------------------------------------------


@dataclass
class FitRecord:
    """How well the run's template-to-subject registration fits (see :func:`fit_record`)."""

    similarity_measure: str
    similarity_before: float
    similarity_after: float
    folded_fraction: float
    min_jacobian: float
    velocity_max_mm: float
    velocity_p95_mm: float
    displacement_max_mm: float
    displacement_p95_mm: float
    log_jacobian_sd: float
    log_jacobian_p01: float
    log_jacobian_p99: float
    registered_volumes_ml: dict
    subject_volumes_ml: dict
    residual: dict  # registered / subject - 1 per region
    regional_similarity_ratio: dict  # LNCC^2 around each structure / LNCC^2 over the brain, after registration
    limits: dict
    beyond_registration: bool
    reasons: list = field(default_factory=list)
    template_volumes_ml: dict = field(default_factory=dict)  # the reference template's at the subject's age
    ratio_to_template: dict = field(default_factory=dict)  # subject's own / template's, per structure

    def to_json(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 5)
            elif isinstance(value, dict):
                out[key] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in value.items()}
        return out

    def lines(self) -> list[str]:
        """Plain-text summary for the report."""
        res = ", ".join(f"{k} {100 * v:+.0f}%" for k, v in self.residual.items())
        local = ", ".join(f"{k} {v:.2f}" for k, v in self.regional_similarity_ratio.items())
        text = [
            f"template-to-subject fit: LNCC^2 {self.similarity_before:.2f} -> {self.similarity_after:.2f}; "
            f"folded voxels {100 * self.folded_fraction:.3f}%; |v| max {self.velocity_max_mm:.1f} mm "
            f"(95th pct {self.velocity_p95_mm:.1f}); log-Jacobian SD {self.log_jacobian_sd:.2f}",
            f"registration-only volume vs the subject's own: {res}; local/brain similarity: {local}",
        ]
        if self.beyond_registration:
            text.append("WARNING: " + self.warning())
        return text

    def warning(self) -> str:
        """The sentence said when the subject lies beyond what the registration captured ('' otherwise)."""
        if not self.beyond_registration:
            return ""
        return ("the subject lies beyond what the registration captured (" + "; ".join(self.reasons)
                + "): the ageing may not land on the subject's own structures")


def _similarity_map(fixed: torch.Tensor, moving: torch.Tensor, window: int = 5) -> torch.Tensor:
    from inbrainsyn.registration.similarity import lncc_map

    return lncc_map(fixed.float(), moving.float(), window)


def _weighted(values: torch.Tensor, weights: torch.Tensor) -> float:
    return float((values * weights).sum() / weights.sum().clamp_min(1e-6))


def fit_record(fixed: torch.Tensor, template: torch.Tensor, velocity: torch.Tensor, displacement: torch.Tensor,
               brain: torch.Tensor, spacing_zyx, registered_volumes: dict, subject_volumes: dict,
               structures: dict | None = None, template_volumes: dict | None = None) -> FitRecord:
    """Measure the fit of ``template o exp(v) ~ fixed`` (all ``(Z, Y, X)`` / ``(3, Z, Y, X)`` on one grid).

    brain: ``(Z, Y, X)`` the subject's brain (weights of the similarity and of the field statistics);
    registered_volumes: regional volumes of the run's template labels carried by ``v``;
    subject_volumes: the subject's own (:meth:`SubjectAnatomy.volumes_ml`);
    structures: ``{region: (Z, Y, X) map}`` the registered template's structures, for the local similarity
    (weights: the map smoothed by a 3 mm Gaussian, so the structure's border counts);
    template_volumes: the reference template's own volumes (same units as ``subject_volumes``), for
    :data:`CAPTURE_RATIO_LIMITS` (how far the subject's structures are from the template's).
    """
    inside = brain > 0.5
    before = _weighted(_similarity_map(fixed, template), brain.float())
    similarity = _similarity_map(fixed, fields.warp(template.float(), displacement.float()))
    after = _weighted(similarity, brain.float())
    local = {}
    for region, region_map in (structures or {}).items():
        zone = torch.from_numpy(_gauss(region_map.float().numpy(), 3.0, spacing_zyx))
        if float(zone.sum()) > 1.0 and after > 0:
            local[region] = _weighted(similarity, zone) / after
    spacing = torch.tensor([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]], dtype=torch.float32).view(3, 1, 1, 1)
    v_mm = torch.sqrt(((velocity.float() * spacing) ** 2).sum(0))[inside]
    d_mm = torch.sqrt(((displacement.float() * spacing) ** 2).sum(0))[inside]
    det = fields.jacobian_determinant(displacement.float())
    folded = float((det <= 0).float().mean())
    logdet = torch.log(det[inside].clamp_min(1e-6))
    q = lambda t, p: float(torch.quantile(t[:: max(1, t.numel() // 1_000_000)], p)) if t.numel() else 0.0  # noqa: E731
    residual = {
        k: registered_volumes[k] / subject_volumes[k] - 1.0
        for k in ("ventricles", "hippocampus", "amygdala", "gm", "wm", "whole_brain")
        if k in registered_volumes and subject_volumes.get(k, 0.0) > 1e-6
    }
    reasons = []
    for region, limit in CAPTURE_LIMITS.items():
        if region in residual and abs(residual[region]) > limit:
            reasons.append(f"{region}: registration reaches {registered_volumes[region]:.1f} mL of the subject's "
                           f"{subject_volumes[region]:.1f} mL ({100 * residual[region]:+.0f}%, limit {100 * limit:.0f}%)")
    for region, ratio in local.items():
        if ratio < MIN_REGIONAL_SIMILARITY_RATIO:
            reasons.append(f"{region}: local similarity {ratio:.2f} of the brain's (limit {MIN_REGIONAL_SIMILARITY_RATIO})")
    ratio = {k: subject_volumes[k] / template_volumes[k] for k in REGIONAL_FIT
             if template_volumes and template_volumes.get(k, 0.0) > 1e-6 and k in subject_volumes}
    for region, (low, high) in CAPTURE_RATIO_LIMITS.items():
        if region not in ratio:
            continue
        if (low is not None and ratio[region] < low) or (high is not None and ratio[region] > high):
            bounds = f"{low if low is not None else 0:.2f}-{high:.2f}" if high is not None else f">= {low:.2f}"
            reasons.append(f"{region}: {ratio[region]:.2f}x the template's, outside the range on which the "
                           f"registration's volumes were validated ({bounds}x)")
    if after < MIN_CAPTURE_SIMILARITY:
        reasons.append(f"similarity after registration {after:.2f} < {MIN_CAPTURE_SIMILARITY}")
    if folded > 0:
        reasons.append(f"the registration folds ({100 * folded:.3f}% of voxels)")
    return FitRecord(
        similarity_measure="mean squared local NCC (5-voxel window) over the subject's brain, bank grid",
        similarity_before=before,
        similarity_after=after,
        folded_fraction=folded,
        min_jacobian=float(det.min()),
        velocity_max_mm=float(v_mm.max()) if v_mm.numel() else 0.0,
        velocity_p95_mm=q(v_mm, 0.95),
        displacement_max_mm=float(d_mm.max()) if d_mm.numel() else 0.0,
        displacement_p95_mm=q(d_mm, 0.95),
        log_jacobian_sd=float(logdet.std()) if logdet.numel() > 1 else 0.0,
        log_jacobian_p01=q(logdet, 0.01),
        log_jacobian_p99=q(logdet, 0.99),
        registered_volumes_ml=dict(registered_volumes),
        subject_volumes_ml=dict(subject_volumes),
        residual=residual,
        regional_similarity_ratio=local,
        limits={**{f"{k}_residual": v for k, v in CAPTURE_LIMITS.items()}, "min_similarity_after": MIN_CAPTURE_SIMILARITY,
                "min_regional_similarity_ratio": MIN_REGIONAL_SIMILARITY_RATIO,
                **{f"{k}_ratio_to_template": list(v) for k, v in CAPTURE_RATIO_LIMITS.items()}},
        beyond_registration=bool(reasons),
        reasons=reasons,
        template_volumes_ml=dict(template_volumes or {}),
        ratio_to_template=ratio,
    )


def record_fit(anatomy: SubjectAnatomy, fixed: torch.Tensor, template: torch.Tensor, template_labels: torch.Tensor,
               velocity: torch.Tensor, displacement: torch.Tensor, spacing_zyx, scale: float = 1.0,
               reference_labels: torch.Tensor | None = None) -> FitRecord:
    """:func:`fit_record` of the run's registration ``template o exp(v) ~ fixed``, against the subject's own
    regions ``anatomy``; ``template_labels`` ``(Z, Y, X)`` are the run's template labels (carried by ``v`` for the
    registration-only volumes); ``scale`` = ``|det A|`` (bank mm^3 -> input mm^3); ``reference_labels``: the
    cohort-independent reference template's labels at the subject's age (default ``template_labels``), whose
    volumes the subject's own are compared with."""
    carried = registered_label_maps(template_labels, anatomy.values, displacement)
    registered = {k: v * scale for k, v in
                  summary_volumes_from_maps(carried, anatomy.values, anatomy.label_names, anatomy.voxel_ml).items()}
    names = {anatomy.label_names[v]: i for i, v in enumerate(anatomy.values)}
    structures = {region: carried[names[label]] for region, label in REGIONAL_FIT.items() if label in names}
    reference = registered_label_maps(template_labels if reference_labels is None else reference_labels,
                                      anatomy.values, None)
    template_volumes = {k: v * scale for k, v in
                        summary_volumes_from_maps(reference, anatomy.values, anatomy.label_names, anatomy.voxel_ml).items()}
    return fit_record(fixed, template, velocity, displacement, anatomy.maps.sum(0), spacing_zyx, registered,
                      anatomy.volumes_ml(None, scale), structures, template_volumes)
