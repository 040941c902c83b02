"""The Slicer extension's files agree with each other (checked without Slicer).

The widget is loaded from the .ui file and bound to the parameter node through each widget's
"SlicerParameterName" property, so a renamed widget or parameter only fails inside Slicer; these
checks catch that drift here. Also: the extension skeleton has what the Extension Index needs.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "InBrainSynSlicer"
UI = MODULE / "Resources" / "UI" / "InBrainSynSlicer.ui"
SCRIPT = MODULE / "InBrainSynSlicer.py"


def ui_widgets() -> dict:
    """name -> (class, SlicerParameterName or None) for every widget in the .ui file."""
    widgets = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        parameter = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.find("string").text
        widgets[widget.get("name")] = (widget.get("class"), parameter)
    return widgets


def parameter_fields() -> dict:
    """Annotated fields of InBrainSynSlicerParameterNode -> annotation source text."""
    tree = ast.parse(SCRIPT.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InBrainSynSlicerParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_parameter_has_exactly_one_widget_and_back():
    bound = {param: (name, cls) for name, (cls, param) in ui_widgets().items() if param}
    fields = parameter_fields()
    assert set(bound) == set(fields), (set(bound) ^ set(fields))
    # The widget class must be one parameterNodeWrapper can connect to the field's type.
    compatible = {"float": {"QDoubleSpinBox", "ctkSliderWidget"}, "str": {"QLineEdit", "QComboBox"},
                  "bool": {"QCheckBox"}, "pathlib.Path": {"ctkPathLineEdit"},
                  "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}}
    for field, annotation in fields.items():
        base = re.sub(r"Annotated\[(\w[\w.]*),.*", r"\1", annotation)
        assert bound[field][1] in compatible[base], (field, annotation, bound[field])
        if bound[field][1] == "QComboBox":
            assert "Choice(" in annotation, f"{field}: a QComboBox needs a Choice annotation"


def test_widgets_used_by_the_module_exist_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", SCRIPT.read_text()))
    missing = used - set(ui_widgets())
    assert not missing, missing


def test_extension_skeleton_metadata():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', cmake), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    assert "add_subdirectory(InBrainSynSlicer)" in cmake
    module_cmake = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in module_cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    # Every Python file of the module is listed, so a packaged extension is complete.
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", module_cmake))
    assert listed == {p.name for p in (MODULE / "InBrainSynSlicerLib").glob("*.py")}
    s4ext = dict(line.split(" ", 1) for line in (REPO / "InBrainSynSlicer.s4ext").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert s4ext["depends"] == "PyTorch" and s4ext["category"] == "Neuroimaging"
    icon = MODULE / "Resources" / "Icons" / "InBrainSynSlicer.png"
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_has_the_four_scripted_module_classes():
    names = {n.name for n in ast.parse(SCRIPT.read_text()).body if isinstance(n, ast.ClassDef)}
    assert {"InBrainSynSlicer", "InBrainSynSlicerWidget", "InBrainSynSlicerLogic", "InBrainSynSlicerTest"} <= names


def test_engine_source_is_found_from_a_checkout(tmp_path):
    from InBrainSynSlicerLib.dependencies import PACKAGED_ENGINE_FOLDER, engine_source_dir

    assert engine_source_dir(MODULE) == REPO  # "Add additional module paths" = <repo>/InBrainSynSlicer
    packaged = tmp_path / "qt-scripted-modules"
    (packaged / PACKAGED_ENGINE_FOLDER / "Logic" / "inbrainsyn").mkdir(parents=True)
    (packaged / PACKAGED_ENGINE_FOLDER / "pyproject.toml").write_text("[project]\nname='inbrainsyn'\n")
    assert engine_source_dir(packaged) == packaged / PACKAGED_ENGINE_FOLDER
    assert engine_source_dir(tmp_path / "elsewhere") is None
