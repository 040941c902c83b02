"""Results in Slicer's real MRML scene (slicer-core): geometry, hierarchy, sequence, table, plot, .mrb.

Fixture: a phantom engine output (engine_output.py; oblique 32x28x24 grid, spacing 1.1/0.9/1.3 mm)
with baseline 70 y, targets 75 / 80 / 85 y, conversion HC -> AD at 80 y.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import vtk_to_numpy

import slicer
from InBrainSynSlicerLib import input_volume, layout, scene as scene_lib, snapshot
from InBrainSynSlicerLib.manifest import read_manifest

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def expected_ijk_to_ras(path) -> np.ndarray:
    """IJK->RAS from the ITK header: RAS = diag(-1,-1,1) [D diag(s) | o] (ITK files are LPS)."""
    image = sitk.ReadImage(str(path))
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix


def node_matrix(node) -> np.ndarray:
    return np.array(input_volume.ijk_to_ras(node))


def node_array(node) -> np.ndarray:
    image = node.GetImageData()
    nx, ny, nz = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx)


def sh_children_names(scene, item) -> list[str]:
    sh = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids, True)
    return [sh.GetItemName(ids.GetId(i)) for i in range(ids.GetNumberOfIds())]


def load_input_node(scene, path, name="subject_T1"):
    """The user's input volume, loaded as Slicer would (storage node + display node)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.AddDefaultStorageNode(str(path))
    assert node.GetStorageNode().ReadData(node)
    node.CreateDefaultDisplayNodes()
    return node


def scene_fingerprint(scene):
    sh = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    names = sorted(scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes()))
    return scene.GetNumberOfNodes(), ids.GetNumberOfIds(), names


# ---------------------------------------------------------------- what one run adds


def test_volumes_have_the_file_geometry_and_voxels(headless, engine_output_dir):
    result = scene_lib.load_results_into_scene(headless.scene, engine_output_dir)
    manifest = read_manifest(engine_output_dir)
    for image in manifest.images_of_kind("synthetic"):
        node = result.synthetic[image.age]
        np.testing.assert_allclose(node_matrix(node), expected_ijk_to_ras(image.path), atol=1e-5)
        np.testing.assert_array_equal(node_array(node), sitk.GetArrayFromImage(sitk.ReadImage(str(image.path))))
    for image in manifest.images_of_kind("jacobian"):
        np.testing.assert_allclose(node_matrix(result.jacobian[image.age]), expected_ijk_to_ras(image.path), atol=1e-5)
    np.testing.assert_allclose(node_matrix(result.baseline), expected_ijk_to_ras(manifest.baseline().path), atol=1e-5)


def test_nodes_are_named_and_grouped_in_one_folder(headless, engine_output_dir):
    scene = headless.scene
    input_node = load_input_node(scene, engine_output_dir.parent / "baseline.nii.gz")
    result = scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node)
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(result.folder_item_id) == "subject_T1 InBrainSyn HC->AD 70.0-85.0y"
    assert sh.GetItemAttribute(result.folder_item_id, scene_lib.INPUT_ATTRIBUTE) == input_node.GetID()
    names = sh_children_names(scene, result.folder_item_id)
    for expected in ("subject_T1 baseline 70.0y", "subject_T1 synthetic HC 75.0y", "subject_T1 synthetic AD 80.0y",
                     "subject_T1 synthetic AD 85.0y", "subject_T1 Jacobian AD 85.0y", "subject_T1 InBrainSyn ageing browser",
                     "subject_T1 InBrainSyn regional volumes", "subject_T1 InBrainSyn volume vs age",
                     "subject_T1 synthetic HC->AD (browser age)", "subject_T1 Jacobian HC->AD (browser age)"):
        assert expected in names, names
    # Every data node added by the run is inside the folder (so one delete removes the run).
    for node in result.added:
        if node is not None and not (node.IsA("vtkMRMLDisplayNode") or node.IsA("vtkMRMLStorageNode")):
            assert sh.GetItemParent(sh.GetItemByDataNode(node)) == result.folder_item_id, node.GetName()


def test_sequence_is_indexed_by_age_and_the_browser_scrubs(headless, engine_output_dir):
    result = scene_lib.load_results_into_scene(headless.scene, engine_output_dir)
    sequence, browser = result.sequence, result.browser
    assert (sequence.GetIndexName(), sequence.GetIndexUnit()) == ("age", "years")
    assert sequence.GetIndexType() == slicer.vtkMRMLSequenceNode.NumericIndex
    assert [sequence.GetNthIndexValue(i) for i in range(sequence.GetNumberOfDataNodes())] == ["70.0", "75.0", "80.0", "85.0"]
    manifest = read_manifest(engine_output_dir)
    baseline = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.baseline().path)))
    last = sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.images_of_kind("synthetic")[-1].path)))
    assert browser.GetSelectedItemNumber() == 3  # opens on the last target
    np.testing.assert_array_equal(node_array(result.synthetic_proxy), last)
    browser.SetSelectedItemNumber(0)  # scrub back to baseline: the proxy shows the baseline, J == 1
    np.testing.assert_array_equal(node_array(result.synthetic_proxy), baseline)
    assert np.all(node_array(result.jacobian_proxy) == 1.0)
    np.testing.assert_allclose(node_matrix(result.jacobian_proxy), expected_ijk_to_ras(manifest.baseline().path), atol=1e-5)
    browser.SetSelectedItemNumber(2)
    assert node_array(result.jacobian_proxy).max() == pytest.approx(1.15)


def test_jacobian_overlay_colours_and_legend(headless, engine_output_dir):
    result = scene_lib.load_results_into_scene(headless.scene, engine_output_dir)
    display = result.jacobian_proxy.GetDisplayNode()
    assert display.GetColorNodeID() == result.jacobian_colors.GetID()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(scene_lib.JACOBIAN_RANGE)
    colors = result.jacobian_colors
    n = colors.GetNumberOfColors()
    rgba_low, rgba_mid, rgba_high = ([0.0] * 4 for _ in range(3))
    colors.GetColor(1, rgba_low)
    colors.GetColor(n // 2, rgba_mid)
    colors.GetColor(n - 1, rgba_high)
    assert rgba_low[2] > 0.9 and rgba_low[0] < 0.2  # shrinking: blue
    assert max(rgba_mid[:3]) < 0.02  # J = 1: black, adds nothing to the anatomy
    assert rgba_high[0] > 0.9 and rgba_high[2] < 0.2  # growing: red
    legends = [result.jacobian_proxy.GetNthDisplayNode(i) for i in range(result.jacobian_proxy.GetNumberOfDisplayNodes())]
    legend = next(d for d in legends if d.IsA("vtkMRMLColorLegendDisplayNode"))
    assert legend.GetPrimaryDisplayNode() is display and legend.GetVisibility()


def test_table_and_chart_of_regional_volumes(headless, engine_output_dir):
    result = scene_lib.load_results_into_scene(headless.scene, engine_output_dir)
    manifest = read_manifest(engine_output_dir)
    table = result.table.GetTable()
    assert table.GetNumberOfRows() == 4
    ages = [table.GetValueByName(r, "age (years)").ToDouble() for r in range(4)]
    assert ages == [70.0, 75.0, 80.0, 85.0]
    assert [table.GetValueByName(r, "cohort").ToString() for r in range(4)] == ["HC", "HC", "AD", "AD"]
    for region in manifest.volumes.regions:
        ml = [table.GetValueByName(r, f"{region} (mL)").ToDouble() for r in range(4)]
        np.testing.assert_allclose(ml, manifest.volumes.volumes_ml[region])
        percent = [table.GetValueByName(r, f"{region} (% of baseline)").ToDouble() for r in range(4)]
        np.testing.assert_allclose(percent, 100 * np.array(ml) / ml[0])
    chart = result.chart
    assert chart.GetNumberOfPlotSeriesNodes() == len(manifest.volumes.regions)
    assert (chart.GetXAxisTitle(), chart.GetYAxisTitle()) == ("age (years)", "volume (% of baseline)")
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is result.table and series.GetXColumnName() == "age (years)"


def test_input_node_is_never_modified(headless, engine_output_dir):
    scene = headless.scene
    input_node = load_input_node(scene, engine_output_dir.parent / "baseline.nii.gz")
    before = (input_node.GetMTime(), node_matrix(input_node), node_array(input_node).copy(),
              input_node.GetNumberOfDisplayNodes(), input_node.GetStorageNode().GetFileName(), input_node.GetName())
    scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node)
    after = (input_node.GetMTime(), node_matrix(input_node), node_array(input_node),
             input_node.GetNumberOfDisplayNodes(), input_node.GetStorageNode().GetFileName(), input_node.GetName())
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])
    assert before[3:] == after[3:]


# ---------------------------------------------------------------- running again


def test_replace_removes_the_earlier_run_and_add_keeps_both(headless, engine_output_dir):
    scene = headless.scene
    input_node = load_input_node(scene, engine_output_dir.parent / "baseline.nii.gz")
    empty = scene_fingerprint(scene)
    first = scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node)
    after_first = scene_fingerprint(scene)
    scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node, replace=True)
    assert scene_fingerprint(scene)[:2] == after_first[:2]  # same number of nodes and items
    assert first.synthetic[75.0].GetScene() is None  # the earlier nodes are gone
    third = scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node, replace=False)
    assert len(scene_lib.find_result_folders(scene, input_node)) == 2
    assert third.synthetic[75.0].GetName() != "subject_T1 synthetic HC 75.0y"  # unique name for the second copy
    for folder in scene_lib.find_result_folders(scene, input_node):
        scene_lib.remove_result_folder(scene, folder)
    assert scene_fingerprint(scene)[0] == empty[0]  # removing a run leaves no orphan nodes


def test_a_failure_midway_leaves_the_scene_as_it_was(headless, engine_output_dir):
    scene = headless.scene
    input_node = load_input_node(scene, engine_output_dir.parent / "baseline.nii.gz")
    scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node)
    before = scene_fingerprint(scene)
    manifest = read_manifest(engine_output_dir)  # checked while intact ...
    manifest.images_of_kind("jacobian")[-1].path.write_bytes(b"not an image")  # ... then one file breaks
    with pytest.raises(scene_lib.SceneBuildError, match="jacobian_age085.0"):
        scene_lib.load_results_into_scene(scene, manifest, input_node=input_node, replace=True)
    assert scene_fingerprint(scene) == before  # nothing half-added, the earlier run not removed


# ---------------------------------------------------------------- layout and picture


def test_side_by_side_shows_baseline_against_the_browser_age(headless, engine_output_dir):
    scene = headless.scene
    result = scene_lib.load_results_into_scene(scene, engine_output_dir)
    used = layout.show_side_by_side(scene, result.baseline, result.synthetic_proxy, result.jacobian_proxy, result.chart)
    assert layout.layout_node_of(scene).GetViewArrangement() == layout.SIDE_BY_SIDE_LAYOUT_ID
    left, right = used[layout.LEFT_VIEW], used[layout.RIGHT_VIEW]
    assert left.GetBackgroundVolumeID() == result.baseline.GetID()
    assert right.GetBackgroundVolumeID() == result.synthetic_proxy.GetID()
    assert right.GetForegroundVolumeID() == result.jacobian_proxy.GetID()
    assert left.GetLinkedControl() and right.GetLinkedControl()
    plot_views = [scene.GetNthNodeByClass(i, "vtkMRMLPlotViewNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode"))]
    assert any(v.GetPlotChartNodeID() == result.chart.GetID() for v in plot_views)

    def red_pixels(view):
        rgba = snapshot.render_slice_view(headless.slice_logic(view), 160, 160).astype(int)
        return int(((rgba[..., 0] - rgba[..., 2] > 80) & (rgba[..., 0] > 120)).sum())

    assert red_pixels(layout.RIGHT_VIEW) > 50  # the growing ventricle is tinted red at 85 y
    assert red_pixels(layout.LEFT_VIEW) == 0
    result.browser.SetSelectedItemNumber(0)  # at baseline J == 1 everywhere: no tint, same as the left view
    assert red_pixels(layout.RIGHT_VIEW) == 0
    left_img = snapshot.render_slice_view(headless.slice_logic(layout.LEFT_VIEW), 160, 160)
    right_img = snapshot.render_slice_view(headless.slice_logic(layout.RIGHT_VIEW), 160, 160)
    assert np.abs(left_img[..., :3].astype(int) - right_img[..., :3].astype(int)).max() <= 1


# ---------------------------------------------------------------- saving


def test_scene_saved_as_mrb_loads_back_with_every_node(headless, engine_output_dir, tmp_path):
    from InBrainSynSlicerLib.headless import new_headless_slicer

    scene = headless.scene
    input_node = load_input_node(scene, engine_output_dir.parent / "baseline.nii.gz")
    result = scene_lib.load_results_into_scene(scene, engine_output_dir, input_node=input_node)
    mrb = tmp_path / "saved" / "scene.mrb"
    mrb.parent.mkdir()
    scene.SetRootDirectory(str(mrb.parent))
    assert scene.WriteToMRB(str(mrb))
    manifest = read_manifest(engine_output_dir)
    for path in engine_output_dir.parent.iterdir():  # the bundle must not depend on the engine's folder
        path.unlink()

    loaded = new_headless_slicer()
    assert loaded.scene.ReadFromMRB(str(mrb))
    new = loaded.scene

    def by_name(name):
        node = new.GetFirstNodeByName(name)
        assert node is not None, f"{name} missing after reload"
        return node

    for age, node in result.synthetic.items():
        again = by_name(node.GetName())
        np.testing.assert_allclose(node_matrix(again), node_matrix(node), atol=1e-4)
        np.testing.assert_array_equal(node_array(again), node_array(node))
    sequence = by_name(result.sequence.GetName())
    assert (sequence.GetIndexName(), sequence.GetIndexUnit(), sequence.GetNumberOfDataNodes()) == ("age", "years", 4)
    assert [sequence.GetNthIndexValue(i) for i in range(4)] == ["70.0", "75.0", "80.0", "85.0"]
    browser = by_name(result.browser.GetName())
    assert browser.GetMasterSequenceNode().GetName() == sequence.GetName()
    assert browser.GetNumberOfSynchronizedSequenceNodes() >= 1
    table = by_name(result.table.GetName()).GetTable()
    assert table.GetNumberOfRows() == 4
    np.testing.assert_allclose([table.GetValueByName(r, "ventricles (mL)").ToDouble() for r in range(4)],
                               manifest.volumes.volumes_ml["ventricles"], rtol=1e-6)
    chart = by_name(result.chart.GetName())
    assert chart.GetNumberOfPlotSeriesNodes() == len(manifest.volumes.regions)
    jacobian = by_name(result.jacobian[85.0].GetName())
    assert jacobian.GetDisplayNode().GetColorNode().GetName() == result.jacobian_colors.GetName()
    sh = new.GetSubjectHierarchyNode()
    folders = scene_lib.find_result_folders(new)
    assert len(folders) == 1
    assert sh.GetItemName(folders[0]) == "subject_T1 InBrainSyn HC->AD 70.0-85.0y"
    assert "subject_T1 synthetic AD 85.0y" in sh_children_names(new, folders[0])
