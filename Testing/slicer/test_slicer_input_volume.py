"""Which scene nodes the module accepts as input, and writing the input without modifying it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from InBrainSynSlicerLib import input_volume


def volume_node(scene, dims=(20, 22, 24), components=1, class_name="vtkMRMLScalarVolumeNode", name="T1", fill=None):
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_FLOAT, components)
    scalars = image.GetPointData().GetScalars()
    for c in range(components):
        scalars.FillComponent(c, 0.0 if fill is None else fill)
    if fill is None:  # a few varied voxels are enough to make it non-constant
        for i, v in enumerate(np.random.default_rng(0).uniform(0, 100, 50)):
            scalars.SetValue(i, v)
    node.SetAndObserveImageData(image)
    node.SetSpacing(1.1, 0.9, 1.3)
    node.SetOrigin(10.0, -20.0, 5.0)
    return node


def test_a_3d_scalar_volume_is_accepted(headless):
    assert input_volume.input_volume_problems(volume_node(headless.scene)) == []


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda s: None, "Select an input volume"),
        (lambda s: volume_node(s, class_name="vtkMRMLLabelMapVolumeNode", name="seg"), "label map"),
        (lambda s: volume_node(s, dims=(64, 64, 1), name="slice"), "is 2D (64 x 64 x 1"),
        (lambda s: volume_node(s, components=3, name="rgb"), "3 components"),
        (lambda s: volume_node(s, components=3, class_name="vtkMRMLVectorVolumeNode", name="vec"), "vector"),
        (lambda s: volume_node(s, dims=(4, 40, 40), name="tiny"), "too small"),
        (lambda s: volume_node(s, fill=7.0, name="flat"), "constant"),
    ],
)
def test_unusable_inputs_are_explained(headless, make, fragment):
    problems = input_volume.input_volume_problems(make(headless.scene))
    assert problems and fragment in problems[0], problems


def test_a_frame_of_a_4d_sequence_is_refused(headless):
    scene = headless.scene
    frame = volume_node(scene, name="frame")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    sequence.SetDataNodeAtValue(frame, "0")
    sequence.SetDataNodeAtValue(frame, "1")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    proxy = browser.GetProxyNode(sequence)
    problems = input_volume.input_volume_problems(proxy)
    assert problems and "4D sequence" in problems[0]


def test_a_transformed_volume_asks_to_harden(headless):
    node = volume_node(headless.scene)
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "move")
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert any("Harden" in p for p in input_volume.input_volume_problems(node))


def test_export_writes_the_geometry_and_leaves_the_node_alone(headless, tmp_path):
    node = volume_node(headless.scene)
    direction = vtk.vtkMatrix4x4()
    for r, row in enumerate([[0, -1, 0], [1, 0, 0], [0, 0, 1]]):  # a 90 degree rotation about S
        for c, value in enumerate(row):
            direction.SetElement(r, c, value)
    node.SetIJKToRASDirectionMatrix(direction)
    mtime, storage_count = node.GetMTime(), node.GetNumberOfStorageNodes()
    path = input_volume.export_input_volume(node, tmp_path / "in" / "input.nii.gz")
    assert node.GetMTime() == mtime and node.GetNumberOfStorageNodes() == storage_count
    image = sitk.ReadImage(str(path))
    ras = np.array(input_volume.ijk_to_ras(node))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing()), lps[:3, :3], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-5)
    vtk_values = vtk.util.numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).ravel(), vtk_values)


def test_axial_slice_index_follows_the_most_superior_axis(headless):
    node = volume_node(headless.scene, dims=(20, 22, 24))  # spacing 1.1, 0.9, 1.3; origin (10, -20, 5)
    assert input_volume.axial_slice_index(node, (12.0, -15.0, 5.0 + 1.3 * 7)) == 7
    assert input_volume.axial_slice_index(node, (0.0, 0.0, 1000.0)) == 23  # clipped to the last slice
    # A coronal acquisition: k points anterior, j points superior -> the index runs along j.
    direction = vtk.vtkMatrix4x4()
    for r, row in enumerate([[1, 0, 0], [0, 0, 1], [0, 1, 0]]):
        for c, value in enumerate(row):
            direction.SetElement(r, c, value)
    node.SetIJKToRASDirectionMatrix(direction)
    assert input_volume.axial_slice_index(node, (12.0, -15.0, 5.0 + 0.9 * 5)) == 5  # S = 0.9 j + 5
