"""Registration: SVF instance optimisation (torch) and affine alignment (SimpleITK).

* :func:`register_svf` -- tensors on one grid -> SVF ``v`` with ``moving o exp(v) ~ fixed``.
* :func:`register_images` -- the same on SimpleITK images (geometry handled).
* :func:`affine_register` -- 12-dof affine (Mattes MI), fixed points -> moving points.
"""

from inbrainsyn.registration.affine import AffineConfig, affine_register, resample_to, transform_error_mm
from inbrainsyn.registration.images import moving_on_fixed_grid, register_images, result_images
from inbrainsyn.registration.svf import SVFRegistrationConfig, SVFRegistrationResult, register_svf

__all__ = [
    "AffineConfig",
    "SVFRegistrationConfig",
    "SVFRegistrationResult",
    "affine_register",
    "moving_on_fixed_grid",
    "register_images",
    "register_svf",
    "resample_to",
    "result_images",
    "transform_error_mm",
]
