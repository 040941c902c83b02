"""Check that a scene node can feed the engine, and write it to a file without touching it.

Plain Python on MRML classes, tested with slicer-core. The engine takes one 3D scalar T1 image;
anything else gets a sentence saying what is wrong and what to do.
"""

from __future__ import annotations

from pathlib import Path

import slicer
import vtk

# Smaller than this along any axis is not a brain MRI the templates can be registered to
# (the phantom test volumes are 24-32 voxels; clinical T1 are 160-256).
MIN_VOXELS_PER_AXIS = 8


def _is_sequence_proxy(node) -> bool:
    """True when ``node`` is the proxy (current frame) of a sequence browser: a 4D volume."""
    scene = node.GetScene()
    if scene is None:
        return False
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    try:
        for i in range(browsers.GetNumberOfItems()):
            if browsers.GetItemAsObject(i).IsProxyNodeID(node.GetID()):
                return True
    finally:
        browsers.UnRegister(None)
    return False


def input_volume_problems(node) -> list[str]:
    """Why ``node`` cannot be the engine's input, as sentences (empty list: it can)."""
    if node is None:
        return ["Select an input volume (a 3D T1-weighted MRI)."]
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return [f"'{name}' is a label map (segmentation labels), not an MRI; select the T1-weighted volume."]
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode") or node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        return [f"'{name}' is a vector / multi-channel volume; select a single-channel 3D T1-weighted MRI."]
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        return [f"'{name}' is not a scalar volume; select a 3D T1-weighted MRI."]
    image = node.GetImageData()
    if image is None:
        return [f"'{name}' has no image data."]
    if image.GetNumberOfScalarComponents() != 1:
        return [f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel (4D or colour); select a single-channel 3D MRI."]
    if _is_sequence_proxy(node):
        return [f"'{name}' is one frame of a 4D sequence; the engine needs a single 3D scan (export the frame you want first)."]
    dims = image.GetDimensions()
    if min(dims) == 1:
        return [f"'{name}' is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels); the engine needs a 3D volume."]
    if min(dims) < MIN_VOXELS_PER_AXIS:
        return [f"'{name}' is only {dims[0]} x {dims[1]} x {dims[2]} voxels; that is too small for a brain MRI."]
    problems = []
    if node.GetParentTransformNode() is not None:
        problems.append(f"'{name}' is under a transform; harden it (Data module, right-click, Harden transform) so the engine sees what you see.")
    low, high = image.GetScalarRange()
    if not high > low:
        problems.append(f"'{name}' is constant ({low:g}); it holds no image.")
    return problems


def export_input_volume(node, path, compress: bool = True) -> Path:
    """Write ``node`` to ``path`` (e.g. .nii.gz, ITK LPS) with a stand-alone storage node.

    The node is not modified: no storage node is attached to it and its data stays as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(bool(compress))
    if not storage.WriteData(node):
        raise OSError(f"could not write '{node.GetName()}' to {path}")
    return path


def ijk_to_ras(node) -> list[list[float]]:
    """The node's 4x4 IJK->RAS matrix as nested lists."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def axial_slice_index(node, ras_point) -> int:
    """Index of the voxel slice of ``node`` that contains ``ras_point``, along its most axial axis.

    The most axial axis is the IJK axis whose RAS direction has the largest |S| component
    (k for a usual axial scan, j for a coronal acquisition...). The index is clipped to the image.
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    axis = max(range(3), key=lambda a: abs(ijk_to_ras.GetElement(2, a)))
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    ijk = ras_to_ijk.MultiplyPoint([float(ras_point[0]), float(ras_point[1]), float(ras_point[2]), 1.0])
    size = node.GetImageData().GetDimensions()[axis]
    return int(min(max(round(ijk[axis]), 0), size - 1))
