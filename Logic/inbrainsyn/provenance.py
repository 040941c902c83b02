"""What every manifest.json records about the software that made it."""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    """Versions of inbrainsyn, Python and the libraries that shape the numbers."""
    import numpy
    import scipy
    import SimpleITK as sitk
    import torch

    from inbrainsyn import __version__

    return {
        "inbrainsyn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "SimpleITK": sitk.Version_VersionString(),
    }
