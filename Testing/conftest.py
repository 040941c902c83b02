"""Shared fixtures: small smooth random fields and real MNI152 data (from the nilearn wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from synthetic_fields import smooth_random_field


@pytest.fixture
def random_field():
    return smooth_random_field


def mni_data_dir() -> Path | None:
    """Folder of the MNI152 2009a maps inside the installed nilearn package (not imported: slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return folder if (folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").exists() else None


@pytest.fixture(scope="session")
def mni_dir():
    folder = mni_data_dir()
    if folder is None:
        pytest.fail("nilearn (test extra) is required for the real-anatomy tests: pip install -e .[test]")
    return folder
