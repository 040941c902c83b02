"""A Slicer scene without the desktop application: MRML scene + the module logics our nodes need.

Inside Slicer the application already owns ``slicer.mrmlScene`` and these logics; this helper is
for pytest (PyPI ``slicer-core``) and for offscreen snapshots. It sets up what the desktop does at
start-up for the node classes we use: application logic, colours (default colour tables, colour
legend node class), sequences (browser node class, proxy nodes updated on item change), subject
hierarchy, layout, scene I/O (.mrb) and one slice logic per slice view.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import slicer
import vtk

SLICE_VIEW_NAMES = ("Red", "Yellow", "Green")


@dataclass
class HeadlessSlicer:
    """Scene and logics; keep this object alive as long as the scene (logics observe it)."""

    scene: object
    app_logic: object
    color_logic: object
    sequences_logic: object
    subject_hierarchy_logic: object
    layout_logic: object
    remote_io_logic: object = None
    data_io_logic: object = None
    cache_dir: object = None
    slice_logics: dict = field(default_factory=dict)

    def slice_logic(self, view_name: str):
        return self.slice_logics[view_name]


def new_headless_slicer(slice_views=SLICE_VIEW_NAMES) -> HeadlessSlicer:
    """Create a scene set up like the desktop's, with slice logics for ``slice_views``."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())

    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app_logic)
    color_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", color_logic)

    sequences_logic = slicer.vtkSlicerSequencesLogic()
    sequences_logic.SetMRMLApplicationLogic(app_logic)
    sequences_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Sequences", sequences_logic)

    subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subject_hierarchy_logic.SetMRMLApplicationLogic(app_logic)
    subject_hierarchy_logic.SetMRMLScene(scene)

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)

    # Scene I/O (.mrb reading needs a data-I/O manager with a cache folder, as in the desktop).
    cache_dir = tempfile.TemporaryDirectory(prefix="inbrainsyn-slicer-cache-")
    remote_io_logic = slicer.vtkMRMLRemoteIOLogic()
    remote_io_logic.SetMRMLScene(scene)
    remote_io_logic.SetMRMLApplicationLogic(app_logic)
    remote_io_logic.GetCacheManager().SetRemoteCacheDirectory(cache_dir.name)
    data_io_logic = slicer.vtkDataIOManagerLogic()
    data_io_logic.SetMRMLScene(scene)
    data_io_logic.SetMRMLApplicationLogic(app_logic)
    data_io_logic.SetAndObserveDataIOManager(remote_io_logic.GetDataIOManager())
    remote_io_logic.AddDataIOToScene()

    headless = HeadlessSlicer(
        scene=scene,
        app_logic=app_logic,
        color_logic=color_logic,
        sequences_logic=sequences_logic,
        subject_hierarchy_logic=subject_hierarchy_logic,
        layout_logic=layout_logic,
        remote_io_logic=remote_io_logic,
        data_io_logic=data_io_logic,
        cache_dir=cache_dir,
    )
    for name in slice_views:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logic.AddSliceNode(name)
        app_logic.GetSliceLogics().AddItem(logic)
        headless.slice_logics[name] = logic
    return headless
