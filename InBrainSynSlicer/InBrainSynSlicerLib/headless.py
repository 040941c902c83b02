"""A Slicer scene without the desktop application: MRML scene + the module logics our nodes need.

Inside Slicer the application already owns ``slicer.mrmlScene`` and these logics; this helper is
for pytest (PyPI ``slicer-core``) and for offscreen snapshots. It sets up what the desktop does at
start-up for the node classes we use: application logic, colours (default colour tables, colour
legend node class), sequences (browser node class, proxy nodes updated on item change), subject
hierarchy, layout and one slice logic per slice view.
"""

from __future__ import annotations

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

    headless = HeadlessSlicer(
        scene=scene,
        app_logic=app_logic,
        color_logic=color_logic,
        sequences_logic=sequences_logic,
        subject_hierarchy_logic=subject_hierarchy_logic,
        layout_logic=layout_logic,
    )
    for name in slice_views:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logic.AddSliceNode(name)
        app_logic.GetSliceLogics().AddItem(logic)
        headless.slice_logics[name] = logic
    return headless
