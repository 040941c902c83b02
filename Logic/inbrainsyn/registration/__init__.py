"""Registration: SVF instance optimisation (torch) and affine alignment (SimpleITK)."""

from inbrainsyn.registration.svf import (
    SVFRegistrationConfig,
    SVFRegistrationResult,
    register_svf,
)

__all__ = ["SVFRegistrationConfig", "SVFRegistrationResult", "register_svf"]
