"""Template banks (format, loader, interpolation), the parametric atrophy model and the default bank.

Public API::

    from inbrainsyn.templates import load_bank, regional_volumes_ml
    bank = load_bank()                      # the shipped default bank (a model, not learned from data)
    bank.template("AD", 72.5)               # sitk.Image, interpolated between listed ages
    u = bank.ageing_svf("HC", 70, 78)       # (3, Z, Y, X) voxel units: template(70) o exp(u) ~ template(78)
"""

from inbrainsyn.templates.regions import CANONICAL_LABELS, REQUIRED_LABEL_NAMES, regional_volumes_ml

__all__ = ["CANONICAL_LABELS", "REQUIRED_LABEL_NAMES", "regional_volumes_ml", "load_bank", "Bank"]


def __getattr__(name):  # lazy: bank.py pulls in registration only when needed
    if name in ("load_bank", "Bank"):
        from inbrainsyn.templates import bank

        return getattr(bank, name)
    raise AttributeError(name)
