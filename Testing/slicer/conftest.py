"""Fixtures for the Slicer module's plain-Python half, run against Slicer's real MRML (PyPI slicer-core).

No fake ``slicer`` module: if slicer-core is missing these tests fail with how to install it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULE_DIR = REPO / "InBrainSynSlicer"
for path in (MODULE_DIR, HERE):  # Slicer puts the module folder on sys.path the same way
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

FAKE_ENGINE = HERE / "fake_inbrainsyn.py"


def _require_slicer():
    try:
        import slicer  # noqa: F401
    except ImportError:
        pytest.fail("slicer-core (test extra) is required for Testing/slicer: pip install slicer-core")


@pytest.fixture
def headless():
    """A fresh scene with the logics the desktop would have."""
    _require_slicer()
    from InBrainSynSlicerLib.headless import new_headless_slicer

    return new_headless_slicer()


@pytest.fixture
def engine_output_dir(tmp_path):
    """A phantom engine result: baseline 70 y, HC, targets 75 / 80 / 85 y, conversion to AD at 80."""
    from engine_output import write_engine_output

    return write_engine_output(tmp_path / "run", age=70.0, cohort="HC", targets=(75.0, 80.0, 85.0), transition_age=80.0)


@pytest.fixture
def fake_engine():
    """Command prefix of the fake engine process (prints the documented JSON events)."""
    return [sys.executable, str(FAKE_ENGINE)]
