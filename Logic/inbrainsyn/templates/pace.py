"""Pace of ageing: a percentile of the cohort's distribution of individual atrophy rates.

People do not all age at the typical pace.  ``--pace P`` asks for the future of a person at the
P-th percentile of the cohort's rate distribution (50 = the median, the bank's own ageing).  Every
regional rate of that person is the cohort's times one factor ``m(P)``, and the template ageing is
scaled along its geodesic: ``u -> m(P) u`` (``exp(m u)``; for a gradient SVF the log-volume change of
every region scales by about ``m``).  This works alike for a model bank and a learned bank.

The factor is lognormal: ``m(P) = exp(sigma * z_P)`` with ``z_P`` the standard normal quantile.

What ``sigma`` is based on (say it plainly): the literature gives the between-person SD of
annual rates, e.g. hippocampus HC 1.9 around 1.0 %/y and AD 2.3 around 4.0 %/y, entorhinal AD 3.9
around 5.9, ventricles AD 5.3 around 9.9 (Schuff 2012, ADNI [verified]); cortical GM AD 2.3 around
5.3 (Thompson 2003 [verified]); ventricle-to-brain ratio AD 2.8 around 15.6 (Bradley 2002 [verified]).
In AD these are coefficients of variation of 0.2-0.6; in HC they exceed 1 because the rates are
small against test-retest noise of about 1-2 %/y, so the reported SDs overstate the true spread
(ATROPHY_LITERATURE.md caveat 2).  Taking out a measurement noise of about 1.5 %/y from the AD
hippocampal SD leaves sqrt(2.3^2 - 1.5^2) / 4.0 = 0.44; "stable" vs "declining" healthy controls
differ by a factor 1.6 in hippocampal rate (Jack 2000 [verified]).  We take ``sigma = 0.35`` for
both cohorts: percentiles 10 / 25 / 50 / 75 / 90 give factors 0.64 / 0.79 / 1 / 1.27 / 1.57, close to
the slow / typical / fast = 0.6 / 1.0 / 1.5 suggested in ATROPHY_LITERATURE.md.  This is a
judgement from reported SDs, not a fitted distribution, and one factor for all regions is a
simplification (individual rates of different regions are correlated, not identical).
"""

from __future__ import annotations

import math
from statistics import NormalDist

from inbrainsyn.errors import InputError

PACE_SIGMA_LOG = 0.35
PACE_BASIS = (
    "lognormal factor exp(0.35 z_P) on every regional rate; sigma judged from the between-person SDs of "
    "annual rates (Schuff 2012, Thompson 2003, Bradley 2002) after removing ~1.5 %/y measurement noise, "
    "and the 1.6x rate ratio of declining vs stable controls (Jack 2000); not a fitted distribution"
)
PACE_LIMITS = (1.0, 99.0)
MEDIAN = 50.0


def check_pace(pace: float) -> float:
    """Validate a percentile; return it as float."""
    if isinstance(pace, bool) or not isinstance(pace, (int, float)) or not math.isfinite(pace):
        raise InputError(f"--pace must be a percentile between {PACE_LIMITS[0]:g} and {PACE_LIMITS[1]:g}, got {pace!r}")
    if not PACE_LIMITS[0] <= pace <= PACE_LIMITS[1]:
        raise InputError(f"--pace {pace:g} is outside {PACE_LIMITS[0]:g}-{PACE_LIMITS[1]:g} (a percentile of the cohort's "
                         "atrophy rates; 50 = typical, 10 = slow, 90 = fast)")
    return float(pace)


def pace_factor(pace: float, sigma_log: float = PACE_SIGMA_LOG) -> float:
    """Rate factor ``m(P) = exp(sigma z_P)`` of percentile ``pace`` (1-99); 1.0 at the median."""
    pace = check_pace(pace)
    if pace == MEDIAN:
        return 1.0
    return math.exp(sigma_log * NormalDist().inv_cdf(pace / 100.0))


def bank_pace_sigma(bank) -> float:
    """The bank's ``pace.sigma_log`` (bank.json) or the default."""
    meta = getattr(bank, "meta", {}) or {}
    value = (meta.get("pace") or {}).get("sigma_log", PACE_SIGMA_LOG) if isinstance(meta.get("pace"), dict) else PACE_SIGMA_LOG
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError("bank.json: pace.sigma_log must be a number") from None
    if not 0.0 <= value <= 2.0:
        raise InputError(f"bank.json: pace.sigma_log {value} must lie in [0, 2]")
    return value
