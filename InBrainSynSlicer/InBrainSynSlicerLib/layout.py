"""The side-by-side view: baseline (left) against the synthetic scan at the browser's age (right).

Plain Python on MRML nodes (layout node, slice nodes, slice composite nodes, plot view node):
inside Slicer the layout manager turns the layout node's arrangement into widgets; headless the
same nodes drive vtkMRMLSliceLogic, which the snapshot renders.
"""

from __future__ import annotations

import slicer

# A custom layout id (Slicer's built-in ids are below 100; extensions pick their own).
SIDE_BY_SIDE_LAYOUT_ID = 5301
LEFT_VIEW = "Red"
RIGHT_VIEW = "Yellow"
PLOT_VIEW = "PlotView1"


def _slice_view_xml(tag: str, label: str, color: str) -> str:
    return (
        f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
        f'<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{color}</property>'
        f"</view></item>"
    )


SIDE_BY_SIDE_LAYOUT_XML = (
    '<layout type="vertical" split="true">'
    '<item splitSize="600"><layout type="horizontal">'
    + _slice_view_xml(LEFT_VIEW, "R", "#F34A33")
    + _slice_view_xml(RIGHT_VIEW, "Y", "#EDD54C")
    + "</layout></item>"
    f'<item splitSize="300"><view class="vtkMRMLPlotViewNode" singletontag="{PLOT_VIEW}">'
    '<property name="viewlabel" action="default">P</property></view></item>'
    "</layout>"
)


def _nodes_by_class(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    try:
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)


def _by_layout_name(scene, class_name: str, layout_name: str):
    for node in _nodes_by_class(scene, class_name):
        if node.GetLayoutName() == layout_name:
            return node
    return None


def layout_node_of(scene):
    """The scene's layout node (a singleton), or None when nothing set one up."""
    nodes = _nodes_by_class(scene, "vtkMRMLLayoutNode")
    return nodes[0] if nodes else None


def show_side_by_side(scene, left_volume, right_volume, overlay_volume=None, chart=None,
                      overlay_opacity: float = 1.0) -> dict:
    """Switch to the side-by-side layout and fill its views.

    Left: ``left_volume`` (the baseline). Right: ``right_volume`` (the sequence proxy, so it
    follows the browser's age) with ``overlay_volume`` (the Jacobian proxy) as a coloured
    foreground added to it (compositing "Add": the Jacobian colour table is black at J = 1, so
    unchanged anatomy keeps its grey value and change tints it). Both views are axial and linked: moving, zooming or scrolling one moves the
    other. Below: the plot view with ``chart``. Returns the composite nodes used, per view.
    Nothing is changed on the volumes themselves.
    """
    layout = layout_node_of(scene)
    if layout is not None:
        if not layout.IsLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID):
            layout.AddLayoutDescription(SIDE_BY_SIDE_LAYOUT_ID, SIDE_BY_SIDE_LAYOUT_XML)
        layout.SetViewArrangement(SIDE_BY_SIDE_LAYOUT_ID)
    used = {}
    for view, background, foreground in (
        (LEFT_VIEW, left_volume, None),
        (RIGHT_VIEW, right_volume, overlay_volume),
    ):
        composite = _by_layout_name(scene, "vtkMRMLSliceCompositeNode", view)
        slice_node = _by_layout_name(scene, "vtkMRMLSliceNode", view)
        if composite is None or slice_node is None:
            continue
        slice_node.SetOrientation("Axial")
        slice_node.SetViewGroup(0)
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(overlay_opacity if foreground is not None else 0.0)
        composite.SetCompositing(slicer.vtkMRMLSliceCompositeNode.Add if foreground is not None else slicer.vtkMRMLSliceCompositeNode.Alpha)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)
        composite.SetHotLinkedControl(True)
        used[view] = composite
    right_slice = _by_layout_name(scene, "vtkMRMLSliceNode", RIGHT_VIEW)
    if overlay_volume is not None and right_slice is not None:
        # The overlay's colour legend belongs to the view that shows the overlay, not to all views.
        for i in range(overlay_volume.GetNumberOfDisplayNodes()):
            display = overlay_volume.GetNthDisplayNode(i)
            if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
                display.SetViewNodeIDs([right_slice.GetID()])
    plot_view = _by_layout_name(scene, "vtkMRMLPlotViewNode", PLOT_VIEW)
    if chart is not None:
        if plot_view is not None:
            plot_view.SetPlotChartNodeID(chart.GetID())
        selection = _nodes_by_class(scene, "vtkMRMLSelectionNode")
        if selection:
            selection[0].SetActivePlotChartID(chart.GetID())
    return used
