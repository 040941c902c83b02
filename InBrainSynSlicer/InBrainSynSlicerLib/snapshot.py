"""Render a slice view offscreen through Slicer's own slice pipeline (no OpenGL, no window).

vtkMRMLSliceLogic reslices each layer (background, foreground) along the slice node, maps it
through its display node (window/level, colour table, threshold) and blends the layers with the
composite node's compositing mode: the image a Slicer slice view shows, minus annotations.
Used for the README picture and to test what the side-by-side view displays.
"""

from __future__ import annotations

import numpy as np
from vtk.util.numpy_support import vtk_to_numpy


def render_slice_view(slice_logic, width: int = 400, height: int = 400, fit: bool = True) -> np.ndarray:
    """RGBA image (height, width, 4) uint8 of what ``slice_logic``'s view shows, top row first."""
    slice_logic.ResizeSliceNode(width, height)
    if fit:
        slice_logic.FitSliceToAll()
    for layer in (slice_logic.GetBackgroundLayer(), slice_logic.GetForegroundLayer(), slice_logic.GetLabelLayer()):
        if layer is not None:
            # Headless nobody renders, so nobody pulls the layers' pipelines: update them here.
            layer.UpdateTransforms()
            layer.UpdateImageDisplay()
    slice_logic.UpdatePipeline()
    connection = slice_logic.GetImageDataConnection()
    producer = connection.GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(connection.GetIndex())
    nx, ny, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)
    return np.ascontiguousarray(rgba[::-1]).astype(np.uint8)  # VTK rows go bottom-up
