"""The module's self-test, run here through the same runner (no desktop): the real engine on the
demo subject at 3 mm, results filed in a real MRML scene (slicer-core).

InBrainSynSlicerTest (in InBrainSynSlicer.py, registered with CTest) does the same inside Slicer,
plus the widget-free logic; it is skipped with ``engine_missing_reason()`` where the engine or torch
is not installed in Slicer's Python.
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk

# Module imports only (no ``from module import name``): slicer-core's ``slicer`` package also imports the
# files of this folder (it is named slicer), so a Lib module may still be initialising at this point.
from InBrainSynSlicerLib import input_volume, runner as runner_lib, scene as scene_lib, selftest

REPO = Path(__file__).resolve().parents[2]


def load_volume(scene, path, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def voxels(node):
    from vtk.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).copy()


def test_the_self_test_input_is_the_demo_subject_at_3_mm(tmp_path):
    import SimpleITK as sitk

    demo = sitk.ReadImage(str(selftest.demo_subject_path()))
    small = sitk.ReadImage(str(selftest.write_small_demo_subject(tmp_path / "s.nii.gz")))
    assert small.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    # Same field of view (within one new voxel) and orientation: the same head, coarser.
    for n_old, s_old, n_new in zip(demo.GetSize(), demo.GetSpacing(), small.GetSize()):
        assert abs(n_old * s_old - n_new * 3.0) <= 3.0
    assert small.GetDirection() == pytest.approx(demo.GetDirection())
    # Mean intensity kept within 5 % (blur + linear resampling preserve it over the head).
    assert float(sitk.GetArrayViewFromImage(small).mean()) == pytest.approx(float(sitk.GetArrayViewFromImage(demo).mean()), rel=0.05)


def test_the_self_test_skips_with_a_reason_where_the_engine_is_absent(monkeypatch):
    assert selftest.engine_missing_reason() is None  # this environment has the engine and torch
    monkeypatch.delenv("INBRAINSYN_ENGINE", raising=False)
    real = selftest.importlib.util.find_spec
    monkeypatch.setattr(selftest.importlib.util, "find_spec", lambda name: None if name == "inbrainsyn" else real(name))
    reason = selftest.engine_missing_reason()
    assert reason and "Install dependencies" in reason
    # The Slicer test turns that reason into unittest.SkipTest (CTest: passed, with the reason in its log).
    tree = ast.parse((REPO / "InBrainSynSlicer" / "InBrainSynSlicer.py").read_text())
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InBrainSynSlicerTest")
    run_test = next(n for n in test_class.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    assert "raise unittest.SkipTest(reason)" in ast.unparse(run_test)
    assert "selftest.engine_missing_reason()" in ast.unparse(run_test)


@pytest.mark.slow
def test_self_test_flow_with_the_real_engine(headless, tmp_path):
    """Apply's path without the widget: capture, export, ``inbrainsyn synthesize --json`` in the
    background, results into the scene under the run's own input (about 1 minute on 2 CPU cores)."""
    scene = headless.scene
    volume = load_volume(scene, selftest.write_small_demo_subject(tmp_path / "demo_3mm.nii.gz"), "demo subject")
    other = load_volume(scene, selftest.write_small_demo_subject(tmp_path / "other.nii.gz"), "other")
    original = voxels(volume)
    runner = runner_lib.Runner(lambda: [sys.executable, "-m", "inbrainsyn"], tmp_path / "tmp", scene)
    from types import SimpleNamespace

    p = SimpleNamespace(inputVolume=volume, age=selftest.DEMO_AGE, cohort="HC", targetAges="75, 80",
                        conversionEnabled=False, conversionAge=78.0, transportMethod="pole", device="cpu",
                        skullStripped=False, templateBank="", outputFolder="", replaceResults=True, pace=50)
    settings = runner_lib.capture_settings(p)
    assert settings.problems() == []
    events = []
    run = runner.start_synthesis(settings)
    with pytest.raises(runner_lib.RunAlreadyGoingError):
        runner.start_synthesis(settings)
    p.inputVolume, p.replaceResults = other, False  # the selector moves during the run
    while run.process.is_running():
        events += run.process.poll()
        time.sleep(0.05)
    events += run.process.poll()
    outcome = run.process.wait()
    runner.release(run)
    assert outcome.succeeded, outcome.message
    assert any(e.get("event") == "progress" for e in events)
    result = runner.load_results(run, outcome.manifest)
    assert sorted(result.synthetic) == [75.0, 80.0]
    assert result.sequence.GetIndexName() == "age" and result.sequence.GetNumberOfDataNodes() == 3
    assert scene_lib.find_result_folders(scene, volume) and not scene_lib.find_result_folders(scene, other)
    np.testing.assert_array_equal(voxels(volume), original)  # the input is never modified
    for node in result.synthetic.values():  # outputs overlay the input exactly (CONTRACTS.md)
        np.testing.assert_allclose(np.array(input_volume.ijk_to_ras(node)), np.array(input_volume.ijk_to_ras(volume)), atol=1e-4)
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    # The ageing is visible and plausible: the synthetic scans differ from the baseline, but not wildly.
    baseline = voxels(volume).astype(float)
    for age, node in result.synthetic.items():
        change = np.abs(voxels(node).astype(float) - baseline)
        assert 0 < np.mean(change) < 0.1 * np.percentile(baseline, 99), (age, float(np.mean(change)))
    jac = vtk.vtkImageData()
    jac.DeepCopy(result.jacobian[80.0].GetImageData())
    from vtk.util.numpy_support import vtk_to_numpy

    j = vtk_to_numpy(jac.GetPointData().GetScalars())
    assert 0.5 < float(np.median(j)) < 1.5 and float(j.min()) > 0  # no folding
