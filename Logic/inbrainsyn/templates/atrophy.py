"""Parametric regional atrophy model and its realisation as a diffeomorphism.

Two parts:

1. :class:`AtrophyModel` -- how much each region changes between two ages, for HC, AD and an
   HC -> AD conversion (annual rates from the literature, METHODS.md section 5).
2. :func:`solve_ageing_svf` -- a stationary velocity field u on a given anatomy (its own region
   maps) such that warping that anatomy by ``exp(u)`` (pull-back) changes every region's volume by
   the prescribed amount, with the brain's loss taken up by CSF inside a fixed skull.

Rate model
----------
Annual log-volume rate of region R (fraction per year) at age a:

* HC:  ``r_HC(a) = rho_HC * max(0.25, 1 + alpha (a - a_ref))`` with ``a_ref = 75`` and
  ``alpha = 0.035 / y`` (Du 2006: hippocampal rate grows by 0.05 %/y per year of age on a
  1.41 %/y rate, i.e. 3.5 % of the rate per year; applied to every region -- an assumption).
* AD:  ``r_AD(a) = r_HC(a) + (rho_AD - rho_HC) * w(a)``, ``w(a) = clip((a - 55) / 10, 0, 1)``:
  the disease excess is age-independent (Leung 2013: no within-group acceleration in AD) and
  ramps in over 55-65 because both cohorts share the anatomy at 55 (model simplification).
* HC -> AD converter with conversion age t: HC rates before t, AD rates after.

Tissue regions integrate in log-volume: ``log V(a1)/V(a0) = int r``.  The lateral ventricles
integrate *linearly* in volume from the model's base age 55 (``V(a) = V55 (1 + int_55^a r)``),
because a compounding +9 %/y over decades is impossible in a skull; absolute ventricular growth
(mL/y) is what Resnick 2003 and Leung 2013 report.  CSF is not prescribed: it absorbs the
remainder so that the intracranial volume is constant.

Realisation (the solver)
------------------------
Pull-back convention (fields.py): the aged image is ``I o phi``.  A region of volume V in ``I``
occupies ``V / det(D phi)`` in ``I o phi``, so a log-volume change ``g`` needs
``log det D phi = -g`` there.  With ``phi = exp(u)`` and ``u = grad(psi)``,
``log det D exp(u) ~ div u = Laplace(psi)`` for small u, so ``psi`` solves the Poisson problem
``Laplace(psi) = f``, ``f = sum_R (-g_R) 1_R`` smoothed, with Neumann boundaries (DCT-II
diagonalises the discrete Neumann Laplacian: eigenvalues ``sum_d 2 cos(pi k_d / N_d) - 2``).
Because ``sum f = 0`` inside the skull (the CSF balances the loss), the field decays outside it.
The linearisation and the smoothing leave errors, so the regional coefficients are corrected
by a damped fixed-point iteration: the achieved change is measured by warping the partial-volume
maps (trilinear) and ``f_R <- f_R - 0.7 (g_R - achieved_R) / gain_R``; final defect-correction rounds
measure on the full grid and correct the coarse goals.  ``u`` is a gradient field and ``exp`` keeps it
diffeomorphic (no folding; checked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.ndimage
import torch
import torch.nn.functional as F

from inbrainsyn import fields
from inbrainsyn.errors import InputError, ProcessingError

COHORTS = ("HC", "AD")

# ---------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionRate:
    """Annual volume change of one region at the reference age (fraction per year, negative = loss).

    ``acceleration``: relative change of the HC rate per year of age (None: the model's default);
    ``ad_hc_ratio``: cross-sectional volume ratio of a typical mild-to-moderate AD patient to an HC
    person of the same age (the model bank's AD templates; 1.0 = no difference).
    """

    region: str
    hc: float
    ad: float
    integration: str  # "log" (compounding) or "linear" (linear in volume from the interval start)
    source: str
    acceleration: float | None = None
    ad_hc_ratio: float = 1.0
    hc_range: tuple[float, float] | None = None  # literature range of the HC rate (%/y as fractions)
    ad_range: tuple[float, float] | None = None


# Regional rates (fraction per year at the reference age 75), acceleration (relative change of the HC
# rate per year of age) and cross-sectional AD/HC ratio.  [v] = verified in an abstract or table,
# [r] = recalled (approximate); see /work/shared/docs/ATROPHY_LITERATURE.md and docs/templates.md.
DEFAULT_RATES: tuple[RegionRate, ...] = (
    RegionRate("hippocampus", -0.0141, -0.0466, "log",
               "HC/AD: Barnes 2009 meta-analysis [v] (HC 0.85-1.73: Fraser 2015, Jack 2000 [v]; AD 3.5-4.7: Jack 2000, "
               "Schuff 2012 [v]); acceleration: Du 2006 +0.05 %/y per year of age [v]; AD/HC 0.77: Shi 2009 [v]",
               acceleration=0.035, ad_hc_ratio=0.77, hc_range=(-0.0173, -0.0085), ad_range=(-0.054, -0.035)),
    RegionRate("amygdala", -0.0100, -0.0400, "log",
               "HC 0.7-1.0, AD 3-4 %/y: Fjell 2009 / Holland 2009 [r]; AD/HC 0.76: Klein-Koerkamp 2014 [v]",
               acceleration=0.035, ad_hc_ratio=0.76, hc_range=(-0.010, -0.007), ad_range=(-0.040, -0.030)),
    RegionRate("entorhinal_parahippocampal", -0.0100, -0.0420, "log",
               "Schuff 2012 [v]: parahippocampal HC 1.0, AD 4.2; entorhinal HC 1.1, AD 5.9 %/y; acceleration Du 2006 "
               "(ERC +0.04 %/y per year) [v]; AD/HC 0.75 (entorhinal 0.61, Du 2001 [v]; whole gyrus: assumption)",
               acceleration=0.035, ad_hc_ratio=0.75, hc_range=(-0.011, -0.010), ad_range=(-0.059, -0.042)),
    RegionRate("lateral_temporal", -0.0070, -0.0280, "log",
               "HC: superior temporal 0.9, fusiform 0.8 (Schuff 2012 [v]), temporal 0.5 (Fjell 2009 [v]); AD: superior "
               "temporal 3.4, fusiform 4.0 (Schuff [v]), middle/inferior 2-3 [r]; accelerating (Storsve 2014 [v])",
               acceleration=0.02, ad_hc_ratio=0.88, hc_range=(-0.009, -0.005), ad_range=(-0.040, -0.020)),
    RegionRate("posterior_cingulate_precuneus", -0.0045, -0.0200, "log",
               "HC 0.3-0.5, AD 1.5-2.5 %/y (McDonald 2009, Sabuncu 2011) [r]; early AD region (McDonald 2009 [v])",
               acceleration=0.02, ad_hc_ratio=0.90, hc_range=(-0.005, -0.003), ad_range=(-0.025, -0.015)),
    RegionRate("inferior_parietal", -0.0050, -0.0200, "log",
               "HC 0.4-0.6, AD ~2 %/y (McDonald 2009) [r]; early AD region (McDonald 2009 [v])",
               acceleration=0.01, ad_hc_ratio=0.90, hc_range=(-0.006, -0.004), ad_range=(-0.025, -0.015)),
    RegionRate("frontal", -0.0050, -0.0120, "log",
               "HC 0.5 %/y prefrontal (Fjell 2009 [v]), 0.4-0.6 [r]; AD 1-1.5 [r], later in AD (McDonald 2009 [v]); "
               "no acceleration: prefrontal decelerates (Storsve 2014 [v]), global GM constant 65-82 (Crivello 2014 [v])",
               acceleration=0.0, ad_hc_ratio=0.94, hc_range=(-0.006, -0.004), ad_range=(-0.015, -0.010)),
    RegionRate("insula", -0.0050, -0.0150, "log", "HC 0.4-0.6, AD 1-2 %/y [r]",
               acceleration=0.0, ad_hc_ratio=0.92, hc_range=(-0.006, -0.004), ad_range=(-0.020, -0.010)),
    RegionRate("sensorimotor", -0.0030, -0.0038, "log",
               "HC 0.2-0.4 %/y [r]; relatively spared in AD (Thompson 2003 [v]); AD set to 1.27x HC (recalled AD "
               "values 0.5-1 %/y would be up to 2.5x HC)",
               acceleration=0.0, ad_hc_ratio=0.97, hc_range=(-0.004, -0.002), ad_range=(-0.010, -0.005)),
    RegionRate("occipital", -0.0035, -0.0045, "log",
               "HC 0.2-0.5 %/y [r] (no mean change in primary visual cortex: Raz 2010 [v]); relatively spared in AD "
               "(lateral occipital late, McDonald 2009 [v]); AD set to 1.29x HC (recalled AD 0.5-1.5 %/y)",
               acceleration=0.0, ad_hc_ratio=0.96, hc_range=(-0.005, -0.002), ad_range=(-0.015, -0.005)),
    RegionRate("cortical_gm", -0.0050, -0.0120, "log",
               "other cortex (anterior/mid cingulate, superior parietal, Heschl, olfactory, cerebellar cortex): "
               "whole-cortex HC 0.51 %/y (Storsve 2014 [v]); AD assumption as frontal",
               acceleration=0.0, ad_hc_ratio=0.95, hc_range=(-0.0083, -0.0035), ad_range=(-0.015, -0.010)),
    RegionRate("subcortical_gm", -0.0050, -0.0130, "log",
               "basal ganglia and thalamus: HC thalamus 0.5-0.8, putamen 0.3-0.5, caudate 0-0.3 %/y [r]; AD 1-2 [r]; "
               "thalamus/putamen affected at CDR 1-2 (Roh 2011 [v])",
               acceleration=0.01, ad_hc_ratio=0.94, hc_range=(-0.008, -0.002), ad_range=(-0.020, -0.010)),
    RegionRate("cerebral_wm", -0.0060, -0.0120, "log",
               "HC: Resnick 2003 -3.1 cm3/y [v] on ~500 cm3, 0.4-0.7 %/y [r]; WM decline steepens after 70 "
               "(BrainChart [r], nonlinear: Walhovd 2011 [v]); AD 1-1.5 %/y [r]",
               acceleration=0.03, ad_hc_ratio=0.95, hc_range=(-0.007, -0.004), ad_range=(-0.015, -0.010)),
    RegionRate("lateral_ventricles", 0.0300, 0.0800, "linear",
               "HC +4.2 %/y (Schuff 2012 [v]), +1.4 cm3/y (Resnick 2003 [v]), doubling 60-85 [r]; AD +9.9 +/- 5.3 %/y "
               "(Schuff 2012 [v]), +5-7 mL/y (Leung 2013 [r]); linear in volume (absolute mL/y, Leung 2013); "
               "AD/HC 1.5 (1.4-1.6 [r])",
               acceleration=0.0, ad_hc_ratio=1.5, hc_range=(0.02, 0.045), ad_range=(0.05, 0.15)),
)
V1_TYPE = "inbrainsyn-parametric-v1"
MODEL_TYPE = "inbrainsyn-parametric-v2"


@dataclass(frozen=True)
class AtrophyModel:
    """Regional volume change between ages for HC, AD and HC->AD converters (see module docstring)."""

    rates: tuple[RegionRate, ...] = DEFAULT_RATES
    reference_age: float = 75.0
    acceleration: float = 0.035  # default relative increase of the HC rate per year of age (Du 2006)
    base_age: float = 55.0  # youngest age of the bank
    ad_ramp_years: float = 0.0  # v1 banks: AD excess ramps in over this many years after base_age; 0 = none
    min_rate_factor: float = 0.25
    balance_region: str = "csf"
    linear_from: str = "start"  # "start": ventricles linear from the interval start; "base" (v1): from base_age

    # -- serialisation (bank.json "atrophy_model") -------------------------------------------
    def to_json(self) -> dict:
        def entry(r: RegionRate) -> dict:
            out = {"HC": r.hc, "AD": r.ad, "integration": r.integration, "source": r.source,
                   "ad_hc_ratio": r.ad_hc_ratio}
            if r.acceleration is not None:
                out["acceleration_per_year"] = r.acceleration
            if r.hc_range is not None:
                out["HC_range"] = list(r.hc_range)
            if r.ad_range is not None:
                out["AD_range"] = list(r.ad_range)
            return out

        return {
            "type": MODEL_TYPE,
            "reference_age": self.reference_age,
            "acceleration_per_year": self.acceleration,
            "base_age": self.base_age,
            "ad_ramp_years": self.ad_ramp_years,
            "min_rate_factor": self.min_rate_factor,
            "balance_region": self.balance_region,
            "linear_from": self.linear_from,
            "rates_per_year": {r.region: entry(r) for r in self.rates},
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "atrophy_model") -> "AtrophyModel":
        kind = data.get("type")
        if kind not in (V1_TYPE, MODEL_TYPE):
            raise InputError(f"{where}: unknown atrophy model type {kind!r}; expected {MODEL_TYPE!r} (or {V1_TYPE!r})")
        v1 = kind == V1_TYPE
        try:
            def pair(value):
                return None if value is None else (float(value[0]), float(value[1]))

            rates = tuple(
                RegionRate(name, float(v["HC"]), float(v["AD"]), str(v.get("integration", "log")), str(v.get("source", "")),
                           acceleration=None if v.get("acceleration_per_year") is None else float(v["acceleration_per_year"]),
                           ad_hc_ratio=float(v.get("ad_hc_ratio", 1.0)),
                           hc_range=pair(v.get("HC_range")), ad_range=pair(v.get("AD_range")))
                for name, v in data["rates_per_year"].items()
            )
            return cls(
                rates=rates,
                reference_age=float(data.get("reference_age", 75.0)),
                acceleration=float(data.get("acceleration_per_year", 0.035)),
                base_age=float(data.get("base_age", 55.0)),
                ad_ramp_years=float(data.get("ad_ramp_years", 10.0 if v1 else 0.0)),
                min_rate_factor=float(data.get("min_rate_factor", 0.25)),
                balance_region=str(data.get("balance_region", "csf")),
                linear_from=str(data.get("linear_from", "base" if v1 else "start")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"{where}: malformed atrophy model ({exc}); see docs/templates.md") from None

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(r.region for r in self.rates)

    def rate(self, region: str, cohort: str, age: float) -> float:
        """Annual rate (fraction per year) of ``region`` for ``cohort`` at ``age``."""
        r = self._rate_entry(region)
        alpha = self.acceleration if r.acceleration is None else r.acceleration
        hc = r.hc * max(self.min_rate_factor, 1.0 + alpha * (age - self.reference_age))
        if cohort == "HC":
            return hc
        if cohort == "AD":
            ramp = 1.0
            if self.ad_ramp_years > 0:
                ramp = min(1.0, max(0.0, (age - self.base_age) / self.ad_ramp_years))
            return hc + (r.ad - r.hc) * ramp
        raise InputError(f"unknown cohort {cohort!r}; use one of {', '.join(COHORTS)}")

    def _rate_entry(self, region: str) -> RegionRate:
        for r in self.rates:
            if r.region == region:
                return r
        raise KeyError(region)

    def integrated_rate(self, region: str, cohort: str, age_from: float, age_to: float,
                        transition_age: float | None = None, steps_per_year: int = 20) -> float:
        """``int_{age_from}^{age_to} r(a) da`` (midpoint rule; negative when age_to < age_from).

        With ``transition_age`` the HC rate applies before it and the AD rate after it.
        """
        if age_to == age_from:
            return 0.0
        sign = 1.0 if age_to > age_from else -1.0
        lo, hi = min(age_from, age_to), max(age_from, age_to)
        n = max(1, int(math.ceil((hi - lo) * steps_per_year)))
        ages = lo + (np.arange(n) + 0.5) * (hi - lo) / n
        total = 0.0
        for a in ages:
            c = cohort
            if transition_age is not None:
                c = "HC" if a < transition_age else "AD"
            total += self.rate(region, c, float(a))
        return sign * total * (hi - lo) / n

    def log_volume_change(self, region: str, cohort: str, age_from: float, age_to: float,
                          transition_age: float | None = None, multiplier: float = 1.0) -> float:
        """Prescribed ``log(V(age_to) / V(age_from))`` of one region.

        ``multiplier`` scales the rates (subject-specific deviation in the phantom).
        """
        r = self._rate_entry(region)
        if r.integration == "log":
            return multiplier * self.integrated_rate(region, cohort, age_from, age_to, transition_age)
        if self.linear_from == "start":
            # linear in volume from the interval's start: V(a1) / V(a0) = 1 + int_a0^a1 r (absolute mL/y);
            # backwards in time is the exact negative of forwards
            lo, hi = min(age_from, age_to), max(age_from, age_to)
            ratio = 1.0 + multiplier * self.integrated_rate(region, cohort, lo, hi, transition_age)
            if ratio <= 0.05:
                raise InputError(f"atrophy model: {region} volume would vanish between ages {age_from} and {age_to}")
            return math.log(ratio) if age_to >= age_from else -math.log(ratio)
        # v1: linear in volume from the base age: V(a) / V(base) = 1 + int_base^a r
        base = min(self.base_age, age_from, age_to)
        start_cohort = "HC" if transition_age is not None else cohort
        v_from = 1.0 + multiplier * self.integrated_rate(region, start_cohort, base, age_from, transition_age)
        v_to = 1.0 + multiplier * self.integrated_rate(region, start_cohort, base, age_to, transition_age)
        if v_from <= 0.05 or v_to <= 0.05:
            raise InputError(f"atrophy model: {region} volume would vanish between ages {age_from} and {age_to}")
        return math.log(v_to / v_from)

    def cross_sectional_ad(self) -> dict[str, float]:
        """``log(V_AD(a) / V_HC(a))`` per region: a typical mild-to-moderate AD patient vs an HC person."""
        return {r.region: math.log(r.ad_hc_ratio) for r in self.rates}

    def targets(self, cohort: str, age_from: float, age_to: float, transition_age: float | None = None,
                multipliers: dict[str, float] | None = None) -> dict[str, float]:
        """Prescribed log-volume changes of every rated region (CSF excluded: it balances)."""
        if cohort not in COHORTS:
            raise InputError(f"unknown cohort {cohort!r}; use one of {', '.join(COHORTS)}")
        multipliers = multipliers or {}
        return {
            r.region: self.log_volume_change(r.region, cohort, age_from, age_to, transition_age,
                                             multipliers.get(r.region, 1.0))
            for r in self.rates
        }


# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------


RELAXATION = 0.7  # damping of the regional coefficient updates (see solve_ageing_svf)


@dataclass
class AtrophySolution:
    """Result of :func:`solve_ageing_svf`.

    velocity: ``(3, Z, Y, X)`` voxel units on the input grid; ``anatomy o exp(velocity)`` is aged.
    goals / achieved: log-volume changes per region (achieved measured on warped partial-volume maps).
    """

    velocity: torch.Tensor
    goals: dict[str, float]
    achieved: dict[str, float]
    min_jacobian: float
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)

    def relative_errors(self) -> dict[str, float]:
        """``|achieved - goal| / |goal|`` per region with a non-negligible goal."""
        return {
            name: abs(self.achieved[name] - goal) / abs(goal)
            for name, goal in self.goals.items()
            if abs(goal) > 1e-6
        }


def poisson_neumann(source: np.ndarray) -> np.ndarray:
    """Solve ``Laplace(psi) = source`` (3-point stencil, unit spacing) with Neumann boundaries.

    The mean of ``source`` is removed first (compatibility condition); ``psi`` has zero mean.
    source: ``(Z, Y, X)`` float64.  DCT-II diagonalises the Neumann Laplacian.
    """
    spectrum = scipy.fft.dctn(source - source.mean(), type=2, norm="ortho", workers=-1)
    eig = np.zeros(source.shape)
    for axis, n in enumerate(source.shape):
        shape = [1, 1, 1]
        shape[axis] = n
        eig = eig + (2.0 * np.cos(np.pi * np.arange(n) / n) - 2.0).reshape(shape)
    eig[0, 0, 0] = 1.0
    spectrum = spectrum / eig
    spectrum[0, 0, 0] = 0.0
    return scipy.fft.idctn(spectrum, type=2, norm="ortho", workers=-1)


def gradient_field(potential: np.ndarray) -> torch.Tensor:
    """``grad(psi)`` as a ``(3, Z, Y, X)`` voxel-unit field with components (x, y, z)."""
    d_dz, d_dy, d_dx = np.gradient(potential)
    return torch.from_numpy(np.stack((d_dx, d_dy, d_dz))).float()


def _downsample_maps(maps: torch.Tensor, shape: tuple[int, int, int], sigma_vox: tuple[float, float, float]) -> torch.Tensor:
    """Anti-aliased resampling of partial-volume maps to ``shape`` (corner-aligned grids)."""
    if tuple(maps.shape[1:]) == tuple(shape):
        return maps
    smooth = torch.from_numpy(
        np.stack([scipy.ndimage.gaussian_filter(m.numpy(), sigma_vox, mode="nearest") for m in maps])
    )
    return F.interpolate(smooth.unsqueeze(0), size=tuple(shape), mode="trilinear", align_corners=True)[0]


def coarse_shape(shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Grid shape with spacing close to ``target_mm`` spanning the same corner voxel centres."""
    return tuple(
        max(8, int(round((n - 1) * s / target_mm)) + 1) if s < target_mm else n
        for n, s in zip(shape, spacing_zyx)
    )


def measure_log_changes(region_maps: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``log(sum warped map / sum map)`` per region ``(R,)``: warp partial-volume maps (trilinear)."""
    before = region_maps.sum(dim=(1, 2, 3)).double()
    after = fields.warp(region_maps, displacement).sum(dim=(1, 2, 3)).double()
    return torch.log(after.clamp_min(1e-6) / before.clamp_min(1e-6))


def balance_goals(volumes: dict[str, float], prescribed: dict[str, float], balance_region: str) -> dict[str, float]:
    """Add the balancing region's goal so that the total volume of all regions stays constant.

    ``dV = sum_R V_R (exp(g_R) - 1)``; the balance region gets ``log(1 - dV / V_balance)``.
    """
    if balance_region not in volumes or volumes[balance_region] <= 0:
        raise InputError(f"atrophy solver: the anatomy has no '{balance_region}' region to take up the volume change")
    change = sum(volumes[n] * (math.exp(g) - 1.0) for n, g in prescribed.items() if n in volumes)
    ratio = 1.0 - change / volumes[balance_region]
    if ratio <= 0.05:
        raise InputError(
            f"atrophy solver: the prescribed changes would need the {balance_region} to shrink to "
            f"{ratio:.2f} of its volume; ask for a shorter age interval"
        )
    goals = {n: float(g) for n, g in prescribed.items() if n in volumes}
    goals[balance_region] = math.log(ratio)
    return goals


DEEP_CSF = "csf_deep"
DEEP_CSF_DEPTH_MM = (8.0, 14.0)  # CSF deeper than this (ramp) grows like the ventricles
DEEP_CSF_FOLLOWS = "lateral_ventricles"
# Deep CSF grows at half the ventricles' log-rate (assumption): the third ventricle and cisterns do
# enlarge with age, but the blurred midline CSF of an average template overstates their volume
# (~33 mL in MNI152 2009a), and a full ventricular rate inflates it into a central blob.
DEEP_CSF_FRACTION = 0.5


def split_deep_csf(maps: torch.Tensor, names: list[str], prescribed: dict[str, float], spacing_zyx,
                   balance_region: str) -> tuple[torch.Tensor, list[str], dict[str, float]]:
    """Split the balancing CSF into outer CSF (balance) and deep CSF that grows with the ventricles.

    Deep CSF spaces (3rd ventricle, cisterns, temporal horns) enlarge with the ventricles; if they
    took up the brain's loss like the outer CSF they would balloon and push the lateral ventricles
    apart.  The weight of a CSF voxel in the deep part ramps from 0 to 1 between
    :data:`DEEP_CSF_DEPTH_MM` of depth below the intracranial surface.  The deep part gets the
    ventricles' log-volume goal times :data:`DEEP_CSF_FRACTION`; the outer part keeps the
    intracranial volume constant.
    """
    if balance_region not in names or DEEP_CSF_FOLLOWS not in prescribed or DEEP_CSF in names:
        return maps, names, prescribed
    csf_index = names.index(balance_region)
    inside = (maps.sum(0) > 0.5).numpy()
    # the box faces count as outside (e.g. the brainstem leaving the field of view is held there too)
    depth = scipy.ndimage.distance_transform_edt(np.pad(inside, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    lo, hi = DEEP_CSF_DEPTH_MM
    weight = torch.from_numpy(np.clip((depth - lo) / (hi - lo), 0.0, 1.0)).float()
    deep = maps[csf_index] * weight
    if float(deep.sum()) < 1.0:
        return maps, names, prescribed
    maps = torch.cat([maps, deep[None]])
    maps[csf_index] = maps[csf_index] - deep
    prescribed[DEEP_CSF] = DEEP_CSF_FRACTION * prescribed[DEEP_CSF_FOLLOWS]
    return maps, names + [DEEP_CSF], prescribed


def solve_ageing_svf(
    region_maps: torch.Tensor,
    region_names: list[str],
    prescribed: dict[str, float],
    spacing_zyx: tuple[float, float, float],
    balance_region: str = "csf",
    smoothing_mm: float = 3.0,
    solve_spacing_mm: float = 2.0,
    iterations: int = 8,
    tolerance: float = 0.03,
    full_rounds: int = 3,
    source_maps: torch.Tensor | None = None,
    pre_displacement: torch.Tensor | None = None,
    fade_mm: float | None = None,
) -> AtrophySolution:
    """SVF u with ``anatomy o exp(u)`` realising the prescribed regional log-volume changes.

    region_maps: ``(R, Z, Y, X)`` partial-volume (or one-hot) maps of the anatomy's regions, named
        by ``region_names`` (background not included).
    prescribed: ``{region: log(V_after / V_before)}``; regions absent from the anatomy are ignored;
        ``balance_region`` (CSF) takes up the total change; other regions get goal 0.
    spacing_zyx: voxel size (mm) along the tensor dims (Z, Y, X).
    The solve runs on a grid of about ``solve_spacing_mm`` (the field is smooth) and the velocity is
    resampled to the input grid.  Up to ``full_rounds`` defect corrections then measure the change on
    the input grid's partial-volume maps and shift the coarse goals by the remaining error.

    Why partial volumes and not nearest-neighbour label counts: a pull-back warp whose displacement
    is below half a voxel leaves a nearest-neighbour label map unchanged, so label counts are a
    quantised, biased measure of the small (sub-voxel) changes of a few years of ageing.  Warping
    one-hot (or partial-volume) maps trilinearly and summing measures the continuum volume.
    When the anatomy is itself a warp of other maps (``region_maps = source_maps o pre``, e.g. a
    phantom subject made from template maps) and the output will be made as
    ``source o (pre o exp(u))``, pass ``source_maps`` and ``pre_displacement`` so the full-grid rounds
    measure exactly that composition (same region order, deep-CSF split included automatically).
    Nothing moves outside the intracranial volume (the union of the maps): the source is made
    exactly zero-mean by putting the residual volume change in the balancing CSF (so the Neumann
    solve adds no uniform divergence to the box), and the velocity is faded to zero over the
    outermost ``fade_mm`` (default :data:`ICV_FADE_MM`) of the intracranial volume, which lie in the
    extra-cerebral CSF.  The intracranial volume is then kept, the field is zero outside it and at
    the box faces, and the fade's divergence lands in the CSF, whose volume the iteration measures.
    Returns an :class:`AtrophySolution`.
    """
    if region_maps.dim() != 4 or region_maps.shape[0] != len(region_names):
        raise ValueError("region_maps must be (R, Z, Y, X) with one name per map")
    full_shape = tuple(int(n) for n in region_maps.shape[1:])
    n_input = len(region_names)
    maps, region_names, prescribed = split_deep_csf(region_maps.float(), list(region_names), dict(prescribed),
                                                    spacing_zyx, balance_region)
    source_before = None
    if source_maps is not None:
        if pre_displacement is None or source_maps.shape[0] != n_input:
            raise ValueError("source_maps needs pre_displacement and one map per region name")
        source_maps = source_maps.float()
        source_before = fields.warp(source_maps, pre_displacement).sum(dim=(1, 2, 3)).double()
        # the CSF is split (deep / outer) on the anatomy's grid only; it keeps the direct measure
        composed_path = torch.tensor([i < n_input and region_names[i] != balance_region
                                      for i in range(len(region_names))])
    volumes_vox = maps.sum(dim=(1, 2, 3)).double()
    volumes = {n: float(v) for n, v in zip(region_names, volumes_vox)}
    goals = balance_goals(volumes, prescribed, balance_region)
    goal_vec = torch.tensor([goals.get(n, 0.0) for n in region_names], dtype=torch.float64)

    shape = coarse_shape(full_shape, spacing_zyx, solve_spacing_mm)
    # spacing of the coarse grid (corner-aligned) and the scale from coarse to full voxel units
    coarse_spacing = tuple(
        s * (n - 1) / max(m - 1, 1) for s, n, m in zip(spacing_zyx, full_shape, shape)
    )
    anti_alias = tuple(max(0.0, 0.5 * (cs / s - 1.0)) for cs, s in zip(coarse_spacing, spacing_zyx))
    coarse_maps = _downsample_maps(maps, shape, anti_alias)
    sigma = tuple(smoothing_mm / cs for cs in coarse_spacing)
    inside = (coarse_maps.sum(0) > 0.5).numpy()
    fade_mm = ICV_FADE_MM if fade_mm is None else fade_mm
    fade = icv_fade(inside, coarse_spacing, fade_mm)
    fine_fade = icv_fade((maps.sum(0) > 0.5).numpy(), spacing_zyx, fade_mm)
    balance = coarse_maps[region_names.index(balance_region)].double().numpy() * inside
    balance = scipy.ndimage.gaussian_filter(balance, sigma, mode="constant")

    coefficients = -goal_vec.clone()  # log det target per region
    gain = torch.ones_like(goal_vec)  # d(achieved) / d(-coefficient) per region
    first_round_gain = True
    history: list[dict[str, float]] = []
    coarse_goal = goal_vec.clone()
    total_iterations = 0
    for _round in range(full_rounds):
        for _ in range(iterations):
            total_iterations += 1
            velocity_coarse = _velocity_from_coefficients(coefficients, coarse_maps, sigma, balance, fade)
            achieved = measure_log_changes(coarse_maps, fields.exp(velocity_coarse))
            history.append({n: float(a) for n, a in zip(region_names, achieved)})
            error = coarse_goal - achieved
            if bool((error.abs() / goal_vec.abs().clamp_min(0.01) <= tolerance).all()):
                break
            # diagonal quasi-Newton update: smoothing and the thin cortical ribbon make a region's
            # response to its own coefficient well below 1, so a plain fixed point is slow.  The
            # response (gain) is measured once, on the first iteration, and then kept: re-estimating
            # it by secants oscillates because neighbouring regions are coupled.
            # Coupling also makes full steps overshoot (period-2 oscillation), hence the damping.
            if first_round_gain:
                gain = (achieved / (-coefficients)).nan_to_num(1.0).clamp(0.3, 1.0)
                first_round_gain = False
            coefficients = coefficients - RELAXATION * error / gain
        velocity = fields.resize_field(velocity_coarse, full_shape) if shape != full_shape else velocity_coarse
        velocity = velocity * fine_fade.unsqueeze(0)  # zero outside the intracranial volume of the input grid too
        displacement = fields.exp(velocity)
        achieved_full = measure_log_changes(maps, displacement)
        if source_maps is not None:  # measure along the path that makes the output: source o (pre o exp(u))
            after = fields.warp(source_maps, fields.compose(pre_displacement, displacement)).sum(dim=(1, 2, 3)).double()
            composed = torch.log(after.clamp_min(1e-6) / source_before.clamp_min(1e-6))
            padded = torch.cat([composed, torch.zeros(len(region_names) - n_input, dtype=composed.dtype)])
            achieved_full = torch.where(composed_path, padded, achieved_full)
        error_full = goal_vec - achieved_full
        if bool((error_full.abs() / goal_vec.abs().clamp_min(0.01) <= tolerance).all()):
            break
        # the coarse maps are blurred versions of the fine ones and respond differently: aim the
        # coarse iterations at a goal shifted by the fine-grid error (a defect correction), bounded
        # so that a region that cannot be resolved does not drag its neighbours along
        limit = 0.5 * goal_vec.abs() + 0.01
        coarse_goal = goal_vec + (coarse_goal + error_full - goal_vec).clamp(-limit, limit)
    min_jac = float(fields.jacobian_determinant(displacement).min())
    if not math.isfinite(min_jac) or min_jac <= 0:
        raise ProcessingError(f"atrophy solver: the ageing deformation folds (min Jacobian {min_jac:.3f}); "
                              "use a shorter age interval or more smoothing")
    return AtrophySolution(
        velocity=velocity,
        goals={n: float(g) for n, g in zip(region_names, goal_vec)},
        achieved={n: float(a) for n, a in zip(region_names, achieved_full)},
        min_jacobian=min_jac,
        iterations=total_iterations,
        history=history,
    )


ICV_FADE_MM = 3.0  # the ageing velocity fades to zero over this depth below the intracranial surface
# (inside the default bank's 5 mm extra-cerebral CSF shell, so the cortex itself is not held)


def icv_fade(inside: np.ndarray, spacing_zyx, fade_mm: float) -> torch.Tensor:
    """Weights ``(Z, Y, X)``: 0 outside ``inside``, rising smoothly (smoothstep) to 1 at ``fade_mm`` depth."""
    # the box faces count as outside (e.g. the brainstem leaving the field of view is held there too)
    depth = scipy.ndimage.distance_transform_edt(np.pad(inside, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    # the outermost layer of voxels (depth one voxel) stays still, so the surface does not move
    t = np.clip((depth - min(spacing_zyx)) / max(fade_mm, 1e-6), 0.0, 1.0)
    return torch.from_numpy(t * t * (3.0 - 2.0 * t)).float()


def _velocity_from_coefficients(coefficients: torch.Tensor, maps: torch.Tensor, sigma, balance: np.ndarray | None = None,
                                fade: torch.Tensor | None = None) -> torch.Tensor:
    """``fade * grad(psi)`` with ``Laplace(psi) = G_sigma * sum_R c_R maps_R`` (Neumann).

    ``balance`` (weights, e.g. the smoothed CSF inside the skull) takes up the source's net sum, so the
    source is exactly zero-mean and the Neumann solve needs no uniform correction over the box.
    """
    source = torch.einsum("r,r...->...", coefficients.float(), maps).double().numpy()
    source = scipy.ndimage.gaussian_filter(source, sigma, mode="nearest")
    if balance is not None and balance.sum() > 0:
        source = source - (source.sum() / balance.sum()) * balance
    velocity = gradient_field(poisson_neumann(source))
    return velocity if fade is None else velocity * fade.unsqueeze(0)
