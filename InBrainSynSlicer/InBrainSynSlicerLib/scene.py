"""Put one engine run's results into an MRML scene, all or nothing.

Plain Python on MRML classes (``import slicer`` works the same in the desktop application and
with PyPI ``slicer-core``), so it is tested without the desktop (Testing/slicer).

What one run adds, all under one subject-hierarchy folder "<input> InBrainSyn <cohorts>":

* ``baseline``: the engine's baseline image (volume "<input> baseline 70.0y");
* one volume per target age: "<input> synthetic HC 75.0y";
* one Jacobian-determinant map per target age: "<input> Jacobian HC 75.0y", shown with a
  diverging colour table (blue < 1 = shrinking, red > 1 = growing, transparent near 1) and a legend;
* a Sequence indexed by age ("age", "years", numeric) holding baseline + targets, a second one with
  the Jacobian maps (the identity map, J = 1, at baseline), and one Sequence browser that plays both,
  so scrubbing the browser moves from baseline to the last target;
* a table of regional volumes (mL and % of baseline, one row per age) and a plot chart of
  regional volume (% of baseline) against age.

The input node is only read (its name and subject-hierarchy parent), never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import slicer
import vtk

from .manifest import Manifest, read_manifest

RESULT_ATTRIBUTE = "InBrainSyn.Result"
INPUT_ATTRIBUTE = "InBrainSyn.InputNodeID"
MANIFEST_ATTRIBUTE = "InBrainSyn.Manifest"

# Jacobian determinant display window: +-20 % volume change saturates the colours. Yearly
# atrophy is ~0.2-2 %/y (METHODS.md), so a decade of ageing sits well inside this window.
JACOBIAN_RANGE = (0.8, 1.2)
JACOBIAN_OVERLAY_OPACITY = 1.0

# Region colours for the plot (RGB 0..1), in the order of volumes.csv's regions.
REGION_COLORS = (
    (0.84, 0.15, 0.16), (0.12, 0.47, 0.71), (1.0, 0.5, 0.05),
    (0.17, 0.63, 0.17), (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.5, 0.5, 0.5),
)


class SceneBuildError(Exception):
    """A result could not be added to the scene; the scene was left as it was before."""


@dataclass
class ResultNodes:
    """Every node added for one run (``added`` in creation order) and the folder holding them."""

    folder_item_id: int = 0
    baseline: object = None
    synthetic: dict = field(default_factory=dict)  # age (years) -> volume node
    jacobian: dict = field(default_factory=dict)  # age (years) -> volume node
    sequence: object = None
    jacobian_sequence: object = None
    browser: object = None
    synthetic_proxy: object = None
    jacobian_proxy: object = None
    jacobian_colors: object = None
    table: object = None
    chart: object = None
    plot_series: list = field(default_factory=list)
    added: list = field(default_factory=list)


def age_label(age: float) -> str:
    """Age as shown in node names and sequence indices: one decimal, e.g. ``75.0``."""
    return f"{float(age):.1f}"


# ---------------------------------------------------------------- small helpers


def _subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def remove_node_and_dependents(scene, node) -> None:
    """Remove a node with its display and storage nodes (MRML leaves those behind otherwise)."""
    if node is None or node.GetScene() is None:
        return
    dependents = []
    for getter_count, getter_nth in (
        ("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
        ("GetNumberOfStorageNodes", "GetNthStorageNode"),
    ):
        if hasattr(node, getter_count):
            dependents += [getattr(node, getter_nth)(i) for i in range(getattr(node, getter_count)())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and dependent.GetScene() is not None:
            scene.RemoveNode(dependent)


def _track(result: ResultNodes, node):
    result.added.append(node)
    return node


def load_volume(scene, path: Path, name: str, result: ResultNodes):
    """Read an image file into a new scalar volume node (ITK LPS file -> RAS node, Slicer's reader).

    The node keeps a storage node pointing at the file, as when Slicer loads a volume.
    """
    node = _track(result, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name)))
    storage = node.GetStorageNode() if node.AddDefaultStorageNode(str(path)) else None
    _track(result, storage)
    if storage is None or not storage.ReadData(node):
        raise SceneBuildError(f"cannot read {path}: Slicer's volume reader failed")
    node.CreateDefaultDisplayNodes()
    _track(result, node.GetDisplayNode())
    return node


def _read_volume_outside_scene(path: Path):
    """Read an image into a volume node that is not in any scene (a sequence item to be copied)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise SceneBuildError(f"cannot read {path}: Slicer's volume reader failed")
    return node


def _identity_jacobian_like(volume_node):
    """A volume on ``volume_node``'s grid filled with 1.0: the Jacobian determinant of no change."""
    node = slicer.vtkMRMLScalarVolumeNode()
    image = vtk.vtkImageData()
    image.SetDimensions(volume_node.GetImageData().GetDimensions())
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    image.GetPointData().GetScalars().Fill(1.0)
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    return node


def _set_primary_sequence(browser, sequence) -> None:
    """Slicer renamed "master" to "primary" sequence; support both spellings."""
    if hasattr(browser, "SetAndObservePrimarySequenceNodeID"):
        browser.SetAndObservePrimarySequenceNodeID(sequence.GetID())
    else:
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())


def make_jacobian_color_table(scene, name: str, result: ResultNodes, number_of_colors: int = 256):
    """Diverging colour table for Jacobian determinants over ``JACOBIAN_RANGE``, black at J = 1.

    Entry k maps t = k / (n-1) in [0, 1], i.e. J = 0.8 + 0.4 t. Colour: blue (t=0, shrinking)
    -> black (t=0.5, J=1, no change) -> red (t=1, growing). Black in the middle because the
    overlay is composited by *addition* (see layout.show_side_by_side): unchanged tissue adds
    nothing and keeps its grey value, while change tints it. Slicer's scalar-volume layers
    ignore a colour table's alpha (opacity comes from the threshold), so a transparent middle
    is not available; addition is the way to leave unchanged anatomy untouched.

    Entry 0 is black too: in "Add" compositing Slicer adds the foreground colour even where its
    alpha is 0, and outside the image the reslicer returns J = 0, which the window clamps to
    entry 0; a blue entry 0 would paint the whole area outside the image "shrinking". So entry 0
    (J <= 0.8016, i.e. 20 % shrinkage or more, which a decade of ageing at 0.2-2 %/y does not
    reach) shows no tint. The Jacobian volumes keep the true values for the data probe.
    """
    colors = _track(result, scene.AddNewNodeByClass("vtkMRMLColorTableNode", scene.GenerateUniqueName(name)))
    colors.SetTypeToUser()
    colors.SetNumberOfColors(number_of_colors)
    for k in range(number_of_colors):
        t = k / (number_of_colors - 1)
        s = min(1.0, abs(2.0 * t - 1.0))  # 0 at J = 1, 1 at the window ends
        rgb = (0.15 * s, 0.45 * s, 1.0 * s) if t < 0.5 else (1.0 * s, 0.15 * s, 0.1 * s)
        jac = JACOBIAN_RANGE[0] + (JACOBIAN_RANGE[1] - JACOBIAN_RANGE[0]) * t
        if k == 0:
            colors.SetColor(k, "J<=0.80 or outside the image", 0.0, 0.0, 0.0, 1.0)
        else:
            colors.SetColor(k, f"J={jac:.3f}", *rgb, 1.0)
    colors.SetAttribute("Category", "InBrainSyn")
    return colors


def _show_as_jacobian(node, colors) -> None:
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colors.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*JACOBIAN_RANGE)
    # J > 0 for any invertible map; 0 is what the slice reslicer returns outside the volume.
    # Thresholding it out keeps the area outside the image from being painted "shrinking" blue.
    display.SetThreshold(1e-3, 1e3)
    display.ApplyThresholdOn()


def add_color_legend(scene, volume_node, result: ResultNodes, title: str):
    """Colour legend (Slicer's vtkMRMLColorLegendDisplayNode) for a volume's display node."""
    legend = scene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode", scene.GenerateUniqueName(title))
    _track(result, legend)
    legend.SetAndObservePrimaryDisplayNode(volume_node.GetDisplayNode())
    legend.SetTitleText(title)
    legend.SetLabelFormat("%.2f")
    volume_node.AddAndObserveDisplayNodeID(legend.GetID())
    legend.SetVisibility(True)
    return legend


# ---------------------------------------------------------------- table and plot


def _add_column(table, name: str, values, array_class=vtk.vtkDoubleArray):
    column = array_class()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    table.AddColumn(column)


def make_volume_table_and_chart(scene, manifest: Manifest, prefix: str, result: ResultNodes):
    """Table "age (years), cohort, <region> (mL)..., <region> (% of baseline)..." and its chart.

    Percent of baseline = 100 * V(age) / V(baseline age): regions differ by three orders of
    magnitude (hippocampus ~4 mL, whole brain ~1100 mL), so the chart plots relative change,
    which puts all regions on one readable axis; the table keeps absolute millilitres.
    """
    volumes = manifest.volumes
    table_node = _track(result, scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{prefix} regional volumes")))
    table = table_node.GetTable()
    _add_column(table, "age (years)", volumes.ages)
    _add_column(table, "cohort", volumes.cohorts, vtk.vtkStringArray)
    baseline_index = min(range(len(volumes.ages)), key=lambda i: abs(volumes.ages[i] - manifest.baseline_age))
    for region in volumes.regions:
        _add_column(table, f"{region} (mL)", volumes.volumes_ml[region])
    for region in volumes.regions:
        values = volumes.volumes_ml[region]
        reference = values[baseline_index]
        _add_column(table, f"{region} (% of baseline)", [100.0 * v / reference if reference else float("nan") for v in values])
    table_node.Modified()

    chart = _track(result, scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{prefix} volume vs age")))
    chart.SetTitle("Regional volume vs age")
    chart.SetXAxisTitle("age (years)")
    chart.SetYAxisTitle("volume (% of baseline)")
    chart.SetLegendVisibility(True)
    for index, region in enumerate(volumes.regions):
        series = _track(result, scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{prefix} {region}")))
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("age (years)")
        series.SetYColumnName(f"{region} (% of baseline)")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetColor(*REGION_COLORS[index % len(REGION_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        result.plot_series.append(series)
    result.table, result.chart = table_node, chart


# ---------------------------------------------------------------- finding earlier results


def find_result_folders(scene, input_node=None) -> list[int]:
    """Subject-hierarchy folder items made by this module (for ``input_node`` only, if given)."""
    sh = _subject_hierarchy(scene)
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    found = []
    for i in range(items.GetNumberOfIds()):
        item = items.GetId(i)
        if sh.GetItemAttribute(item, RESULT_ATTRIBUTE) != "1":
            continue
        if input_node is not None and sh.GetItemAttribute(item, INPUT_ATTRIBUTE) != input_node.GetID():
            continue
        found.append(item)
    return found


def remove_result_folder(scene, folder_item_id: int) -> None:
    """Remove a results folder with every node in it (and their display / storage nodes)."""
    sh = _subject_hierarchy(scene)
    children = vtk.vtkIdList()
    sh.GetItemChildren(folder_item_id, children, True)
    nodes = [sh.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())]
    # Browsers first (they own proxies), then everything else.
    nodes.sort(key=lambda n: 0 if n is not None and n.IsA("vtkMRMLSequenceBrowserNode") else 1)
    for node in nodes:
        remove_node_and_dependents(scene, node)
    sh.RemoveItem(folder_item_id, False, True)


# ---------------------------------------------------------------- the entry point


def _folder_name(input_name: str, manifest: Manifest) -> str:
    cohorts = []
    for image in manifest.images_of_kind("synthetic"):
        if image.cohort not in cohorts:
            cohorts.append(image.cohort)
    ages = manifest.target_ages()
    return f"{input_name} InBrainSyn {'->'.join(cohorts)} {age_label(manifest.baseline_age)}-{age_label(ages[-1])}y"


def _build(scene, manifest: Manifest, input_node, input_name: str, result: ResultNodes) -> None:
    sh = _subject_hierarchy(scene)
    parent_item = sh.GetSceneItemID()
    if input_node is not None and sh.GetItemByDataNode(input_node):
        parent_item = sh.GetItemParent(sh.GetItemByDataNode(input_node))
    folder = sh.CreateFolderItem(parent_item, scene.GenerateUniqueName(_folder_name(input_name, manifest)))
    result.folder_item_id = folder
    sh.SetItemAttribute(folder, RESULT_ATTRIBUTE, "1")
    sh.SetItemAttribute(folder, MANIFEST_ATTRIBUTE, str(manifest.path))
    if input_node is not None:
        sh.SetItemAttribute(folder, INPUT_ATTRIBUTE, input_node.GetID())

    baseline_age = manifest.baseline_age
    baseline_image = manifest.baseline()
    if baseline_image is not None:
        result.baseline = load_volume(scene, baseline_image.path, f"{input_name} baseline {age_label(baseline_age)}y", result)

    colors = make_jacobian_color_table(scene, f"{input_name} InBrainSyn Jacobian colours", result)
    result.jacobian_colors = colors
    for image in manifest.images_of_kind("synthetic"):
        node = load_volume(scene, image.path, f"{input_name} synthetic {image.cohort} {age_label(image.age)}y", result)
        result.synthetic[image.age] = node
    for image in manifest.images_of_kind("jacobian"):
        node = load_volume(scene, image.path, f"{input_name} Jacobian {image.cohort} {age_label(image.age)}y", result)
        _show_as_jacobian(node, colors)
        result.jacobian[image.age] = node

    # Same window/level on every synthetic image as on the baseline: differences then show as
    # differences, not as display changes.
    reference = result.baseline or next(iter(result.synthetic.values()))
    reference_display = reference.GetDisplayNode()
    reference_display.AutoWindowLevelOn()
    reference_display.AutoWindowLevelOff()  # freeze the automatic choice, then copy it
    window, level = reference_display.GetWindow(), reference_display.GetLevel()
    for node in result.synthetic.values():
        node.GetDisplayNode().AutoWindowLevelOff()
        node.GetDisplayNode().SetWindowLevel(window, level)

    _build_sequences(scene, manifest, input_name, result)
    if manifest.volumes is not None:
        make_volume_table_and_chart(scene, manifest, f"{input_name} InBrainSyn", result)

    for node in result.added:
        if node is None or node.GetScene() is None:
            continue
        if node.IsA("vtkMRMLDisplayNode") or node.IsA("vtkMRMLStorageNode"):
            continue
        item = sh.GetItemByDataNode(node) or sh.CreateItem(folder, node)
        sh.SetItemParent(item, folder)


def _build_sequences(scene, manifest: Manifest, input_name: str, result: ResultNodes) -> None:
    """Sequence (baseline + targets, indexed by age in years), Jacobian sequence, one browser."""
    if not result.synthetic:
        return
    cohort_text = "->".join(dict.fromkeys(img.cohort for img in manifest.images_of_kind("synthetic")))
    sequence = _track(result, scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(f"{input_name} synthetic {cohort_text} by age")))
    jacobians = None
    if result.jacobian:
        jacobians = _track(result, scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(f"{input_name} Jacobian {cohort_text} by age")))
    for seq in filter(None, (sequence, jacobians)):
        seq.SetIndexName("age")
        seq.SetIndexUnit("years")
        seq.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)

    baseline_item = manifest.baseline()
    if baseline_item is not None:
        baseline_volume = _read_volume_outside_scene(baseline_item.path)
        sequence.SetDataNodeAtValue(baseline_volume, age_label(manifest.baseline_age))
        if jacobians is not None:
            jacobians.SetDataNodeAtValue(_identity_jacobian_like(baseline_volume), age_label(manifest.baseline_age))
    for age, node in sorted(result.synthetic.items()):
        sequence.SetDataNodeAtValue(node, age_label(age))
        if jacobians is not None and age in result.jacobian:
            jacobians.SetDataNodeAtValue(result.jacobian[age], age_label(age))
    result.sequence, result.jacobian_sequence = sequence, jacobians

    browser = _track(result, scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", scene.GenerateUniqueName(f"{input_name} InBrainSyn ageing browser")))
    _set_primary_sequence(browser, sequence)
    if jacobians is not None:
        browser.AddSynchronizedSequenceNodeID(jacobians.GetID())
    browser.SetPlaybackItemSkippingEnabled(False)
    browser.SetPlaybackRateFps(2.0)
    # Open on the last target age: the most informative frame; the slider goes back to baseline.
    browser.SetOverwriteProxyName(sequence, False)
    if jacobians is not None:
        browser.SetOverwriteProxyName(jacobians, False)
    browser.SetSelectedItemNumber(sequence.GetNumberOfDataNodes() - 1)
    result.browser = browser
    result.synthetic_proxy = browser.GetProxyNode(sequence)
    if result.synthetic_proxy is None:
        raise SceneBuildError("the Sequences module did not create the browser's proxy volume")
    _track(result, result.synthetic_proxy)
    result.synthetic_proxy.SetName(scene.GenerateUniqueName(f"{input_name} synthetic {cohort_text} (browser age)"))
    if jacobians is not None:
        result.jacobian_proxy = _track(result, browser.GetProxyNode(jacobians))
        if result.jacobian_proxy is not None:
            result.jacobian_proxy.SetName(scene.GenerateUniqueName(f"{input_name} Jacobian {cohort_text} (browser age)"))
            proxy_display = result.jacobian_proxy.GetDisplayNode()
            if proxy_display is None:
                result.jacobian_proxy.CreateDefaultDisplayNodes()
            _show_as_jacobian(result.jacobian_proxy, result.jacobian_colors)
            add_color_legend(scene, result.jacobian_proxy, result, "Jacobian determinant")
    proxy_display = result.synthetic_proxy.GetDisplayNode()
    if proxy_display is None:
        result.synthetic_proxy.CreateDefaultDisplayNodes()
        proxy_display = result.synthetic_proxy.GetDisplayNode()
    reference = result.baseline or next(iter(result.synthetic.values()))
    proxy_display.AutoWindowLevelOff()
    proxy_display.SetWindowLevel(reference.GetDisplayNode().GetWindow(), reference.GetDisplayNode().GetLevel())
    for proxy in filter(None, (result.synthetic_proxy, result.jacobian_proxy)):
        for i in range(proxy.GetNumberOfDisplayNodes()):
            result.added.append(proxy.GetNthDisplayNode(i))
        for i in range(proxy.GetNumberOfStorageNodes()):
            result.added.append(proxy.GetNthStorageNode(i))


def rollback(scene, result: ResultNodes) -> None:
    """Remove everything ``result`` added (reverse order), so the scene is as it was."""
    if result.browser is not None and result.browser.GetScene() is not None:
        remove_node_and_dependents(scene, result.browser)
    for node in reversed(result.added):
        if node is not None and node.GetScene() is not None:
            remove_node_and_dependents(scene, node)
    if result.folder_item_id:
        sh = _subject_hierarchy(scene)
        if sh.GetItemName(result.folder_item_id) or sh.GetItemParent(result.folder_item_id):
            sh.RemoveItem(result.folder_item_id, False, True)


def load_results_into_scene(scene, manifest_path, input_node=None, replace: bool = True,
                            input_name: str | None = None) -> ResultNodes:
    """Read the engine's output folder (``manifest.json``) and add its results to ``scene``.

    Atomic: every node is built first; if any step fails, all of them are removed and
    SceneBuildError is raised, leaving the scene as it was. Only after success, with
    ``replace=True``, the earlier results of the same input node are removed; with
    ``replace=False`` they stay and the new results get unique names.
    """
    manifest = manifest_path if isinstance(manifest_path, Manifest) else read_manifest(manifest_path)
    if input_name is None:
        input_name = input_node.GetName() if input_node is not None else Path(str(manifest.inputs.get("image", "input"))).name.split(".")[0]
    earlier = find_result_folders(scene, input_node) if (replace and input_node is not None) else []
    result = ResultNodes()
    scene.StartState(scene.BatchProcessState)
    try:
        try:
            _build(scene, manifest, input_node, input_name, result)
        except Exception as exc:
            rollback(scene, result)
            if isinstance(exc, SceneBuildError):
                raise
            raise SceneBuildError(f"could not add the results of {manifest.path} to the scene: {exc}") from exc
        for folder in earlier:
            remove_result_folder(scene, folder)
    finally:
        scene.EndState(scene.BatchProcessState)
    return result
