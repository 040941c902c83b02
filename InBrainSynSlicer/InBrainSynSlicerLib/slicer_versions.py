"""Which 3D Slicer releases the module supports, and what each bundles in its Python.

Policy (README, docs/slicer.md): the module supports Slicer 5.6, 5.8 and 5.10. The engine is
installed into Slicer's own Python, so it must install and import there: its ``requires-python``
admits each release's Python, and its pins on numpy, scipy and SimpleITK admit the versions Slicer
bundles (the module never lets pip replace them; see ``dependencies``). torch is not bundled: the
PyTorch extension's ``PyTorchUtils`` installs it, asked for the engine's minimum version.

The table is read off Slicer's source at each release tag (github.com/Slicer/Slicer):

* Python: ``Slicer_REQUIRED_PYTHON_VERSION`` in the top-level ``CMakeLists.txt``;
* numpy, scipy, pip: the hashed requirement in ``SuperBuild/External_python-<name>.cmake``;
* SimpleITK: the tag comment of ``Slicer_SimpleITK_GIT_TAG`` in ``SuperBuild/External_SimpleITK.cmake``
  (Slicer builds SimpleITK itself, with its own ImageIO; it must never be replaced by a wheel);
* torch: not bundled; PyTorchUtils installs the newest build for that Python through
  light-the-torch. torch 2.8.0 is the newest release with Python 3.9 wheels
  (``pip index versions torch --python-version 3.9 --only-binary :all:`` said 2.8.0 on 2026-12-01;
  for 3.12 it said 2.15.0, so 5.10 has no ceiling).

Plain Python: no ``slicer`` import, so tests and the module share it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlicerRelease:
    tag: str           # the release tag the row was read from
    python: str        # bundled CPython
    numpy: str
    scipy: str
    simpleitk: str
    pip: str
    newest_torch: str | None  # newest torch with wheels for that Python; None: no ceiling (current releases)


SUPPORTED_RELEASES = (
    SlicerRelease("v5.6.2", python="3.9.10", numpy="1.26.1", scipy="1.11.3", simpleitk="2.2.1", pip="23.3",
                  newest_torch="2.8.0"),
    SlicerRelease("v5.8.1", python="3.9.10", numpy="1.26.4", scipy="1.13.1", simpleitk="2.3.1", pip="24.0",
                  newest_torch="2.8.0"),
    SlicerRelease("v5.10.0", python="3.12.10", numpy="2.0.2", scipy="1.13.1", simpleitk="2.5.2", pip="25.1.1",
                  newest_torch=None),
)

# Packages Slicer bundles: the installer never installs, upgrades or downgrades them.
SLICER_BUNDLED_PACKAGES = ("numpy", "scipy", "SimpleITK")
# Installed through the PyTorch extension (PyTorchUtils), never by plain pip.
TORCH_PACKAGES = ("torch",)

MINIMUM_SLICER = (5, 6)


def release_minor(tag: str) -> tuple:
    """``"v5.8.1"`` -> ``(5, 8)``."""
    major, minor = tag.lstrip("v").split(".")[:2]
    return int(major), int(minor)


def version_problem(major: int, minor: int) -> str | None:
    """A sentence for the user when this Slicer is older than the oldest supported release, else None.

    Newer releases than the table are accepted (with the same requirements they are expected to work).
    """
    if (int(major), int(minor)) < MINIMUM_SLICER:
        supported = ", ".join("{}.{}".format(*release_minor(r.tag)) for r in SUPPORTED_RELEASES)
        return (f"InBrainSyn needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or newer (supported: {supported}); "
                f"this is Slicer {major}.{minor}. Install a newer Slicer from download.slicer.org.")
    return None
