"""Where shipped resources live, both in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path


def resource_dir() -> Path:
    """Folder of the shipped data (``Resources/`` in the repository, ``inbrainsyn/data`` when installed)."""
    import inbrainsyn.data as data_pkg

    return Path(data_pkg.__file__).resolve().parent


def resource_path(*parts: str) -> Path:
    """Path of a shipped resource, e.g. ``resource_path("bank", "default", "bank.json")``."""
    return resource_dir().joinpath(*parts)
