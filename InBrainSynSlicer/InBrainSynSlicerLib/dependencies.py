"""What the module needs in Slicer's Python, and where the engine's source ships.

Order matters when installing: torch first, through the PyTorch extension (it picks the CPU or
the right CUDA build for this computer), then the engine from the extension's own folder; pip then
finds torch satisfied and does not pull a second, multi-gigabyte torch from PyPI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Folder name the extension's CMake install gives the engine source, next to the module file.
PACKAGED_ENGINE_FOLDER = "InBrainSynEngine"


def engine_source_dir(module_dir) -> Path | None:
    """The folder to ``pip install`` the engine from, or None.

    Packaged extension: ``<module dir>/InBrainSynEngine`` (installed by CMakeLists.txt).
    Source checkout ("Add additional module paths" = ``<repo>/InBrainSynSlicer``): the
    repository root, which holds pyproject.toml and Logic/inbrainsyn.
    """
    module_dir = Path(module_dir)
    for candidate in (module_dir / PACKAGED_ENGINE_FOLDER, module_dir.parent):
        if (candidate / "pyproject.toml").is_file() and (candidate / "Logic" / "inbrainsyn").is_dir():
            return candidate
    return None


def missing_python_packages() -> list[str]:
    """Which of torch / inbrainsyn this Python cannot import (checked without importing them)."""
    return [name for name in ("torch", "inbrainsyn") if importlib.util.find_spec(name) is None]
