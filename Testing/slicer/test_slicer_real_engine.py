"""End to end with the real engine: ``inbrainsyn synthesize --json`` in the background, then the scene.

Needs the shipped default template bank (Resources/bank/default); skipped, saying so, where the
checkout has none. The input is MNI152 2009a T1 (nilearn package data) resampled to 3 mm, brain only.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk

from InBrainSynSlicerLib import engine, scene as scene_lib

pytestmark = pytest.mark.slow


def default_bank_is_valid() -> bool:
    from inbrainsyn.paths import resource_path

    bank = resource_path("bank", "default")
    if not (bank / "bank.json").is_file():
        return False
    return engine.run_engine([sys.executable, "-m", "inbrainsyn", "bank", "validate", str(bank)]).exit_code == 0


@pytest.fixture(scope="module")
def small_t1(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("nilearn")  # its data folder, without importing nilearn (slow)
    if spec is None:
        pytest.fail("nilearn (test extra) is required: pip install -e .[test]")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = sitk.ReadImage(str(folder / name.format("t1")), sitk.sitkFloat32)
    tissue = sitk.ReadImage(str(folder / name.format("gm")), sitk.sitkFloat32) + sitk.ReadImage(str(folder / name.format("wm")), sitk.sitkFloat32)
    t1 = sitk.Mask(t1, tissue > 0.3)  # brain only (the engine is told --skull-stripped)
    size = [int(round(n / 3)) for n in t1.GetSize()]
    small = sitk.Resample(t1, size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), (3.0, 3.0, 3.0), t1.GetDirection())
    path = tmp_path_factory.mktemp("t1") / "mni_3mm.nii.gz"
    sitk.WriteImage(small, str(path))
    return path


def test_real_engine_results_load_into_the_scene(headless, small_t1, tmp_path):
    if not default_bank_is_valid():
        pytest.skip("no valid default template bank in this checkout (Resources/bank/default)")
    request = engine.SynthesisRequest(input_path=str(small_t1), age=70.0, cohort="HC", targets=(75.0, 80.0),
                                      output_dir=str(tmp_path / "out"), transition_age=78.0, device="cpu",
                                      skull_stripped=True)
    events = []
    outcome = engine.run_engine(engine.synthesize_argv([sys.executable, "-m", "inbrainsyn"], request), on_event=events.append)
    assert outcome.succeeded, outcome.message
    assert any(e["event"] == "progress" for e in events)
    result = scene_lib.load_results_into_scene(headless.scene, outcome.manifest)
    assert sorted(result.synthetic) == [75.0, 80.0]
    assert result.sequence.GetNumberOfDataNodes() == 2 + (result.baseline is not None)
    reference = sitk.ReadImage(str(small_t1))
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    matrix[:3, 3] = reference.GetOrigin()
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
    from InBrainSynSlicerLib.input_volume import ijk_to_ras

    for node in result.synthetic.values():  # every output lies on the input's grid (CONTRACTS.md)
        np.testing.assert_allclose(np.array(ijk_to_ras(node)), expected, atol=1e-4)
    if result.table is not None:
        assert result.table.GetTable().GetNumberOfRows() == 3
