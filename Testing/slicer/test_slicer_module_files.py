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


def path_fields() -> dict:
    """PATH_FIELDS of the module (parameter -> widget), read from its source."""
    tree = ast.parse(SCRIPT.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PATH_FIELDS")
    return ast.literal_eval(node.value)


def test_every_parameter_has_exactly_one_widget_and_back():
    bound = {param: (name, cls) for name, (cls, param) in ui_widgets().items() if param}
    fields = parameter_fields()
    by_hand = path_fields()
    assert set(bound) | set(by_hand) == set(fields), (set(bound) ^ set(fields))
    assert not set(bound) & set(by_hand), "a path field is bound twice"
    # The widget class must be one parameterNodeWrapper can connect to the field's type (the
    # canRepresent methods of parameterNodeWrapper/guiConnectors.py at v5.6.2, v5.8.1 and v5.10.0).
    compatible = {"float": {"QDoubleSpinBox", "ctkSliderWidget"}, "str": {"QLineEdit", "QComboBox"},
                  "int": {"QSpinBox", "QSlider"}, "bool": {"QCheckBox"},
                  "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"}}
    widgets = ui_widgets()
    for field, widget in by_hand.items():
        assert fields[field] == "str", (field, fields[field])
        assert widgets[widget][0] == "ctkPathLineEdit" and widgets[widget][1] is None, widget
    for field, annotation in fields.items():
        if field in by_hand:
            continue
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


def test_path_fields_stay_empty_when_empty():
    """pathlib.Path through Slicer's ctkPathLineEdit connector turns "no path" into ".": its write() sets
    ``currentPath = str(value)`` (guiConnectors.py, ctkPathLineEditToPathConnector, same at v5.6.2, v5.8.1,
    v5.10.0) and ``str(pathlib.Path(""))`` is "."; ctkPathLineEdit::setCurrentPath shows the text as given
    (CTK at each release's External_CTK.cmake tag). So the module keeps both fields as text, bound by hand."""
    import pathlib

    from InBrainSynSlicerLib.runner import path_text

    assert str(pathlib.Path("")) == "."  # the defect, reproduced on the Python side of the connector
    for empty in ("", ".", None, "  "):
        assert path_text(empty) == ""
    assert path_text(" /data/bank ") == "/data/bank"
    tree = ast.parse(SCRIPT.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InBrainSynSlicerParameterNode")
    defaults = {n.target.id: n.value for n in cls.body if isinstance(n, ast.AnnAssign)}
    for field in path_fields():
        assert isinstance(defaults[field], ast.Constant) and defaults[field].value == "", field


def test_gui_is_connected_with_a_tag_that_every_supported_slicer_returns():
    """Slicer 5.6.2 and 5.8.1's ``connectGui`` returns None (wrapper.py ``_connectGui`` calls
    ``_connectParametersToGui`` without returning its tag; 5.10.0 returns it), so ``disconnectGui(tag)`` could
    not undo it and each enter() stacked a connection that reset the combos. ``connectParametersToGui``
    returns the tag on all three; the module must use it, and keep the tag it returns."""
    source = SCRIPT.read_text()
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert not [c for c in calls if c.func.attr == "connectGui"], "connectGui's tag is None on Slicer 5.6/5.8"
    assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
               and isinstance(n.value.func, ast.Attribute) and n.value.func.attr == "connectParametersToGui"]
    assert assigns and all(ast.unparse(a.targets[0]) == "self._parameterNodeGuiTag" for a in assigns)
    # Each disconnectGui gets that tag, and a node that is already connected is not connected again.
    disconnects = [c for c in calls if c.func.attr == "disconnectGui"]
    assert disconnects and all(ast.unparse(c.args[0]) == "self._parameterNodeGuiTag" for c in disconnects)
    assert "already connected to this node" in source


def test_extensions_index_json_entry_follows_the_schema():
    """InBrainSynSlicer.json, the Extensions Index description (5.8 and later), checked against
    slicer-extension-catalog-entry-schema-v1.0.1.json (Slicer/ExtensionsIndex schemas/, draft-07): required
    $schema, category, scm_url; no other keys than the schema's properties; each of the right type."""
    import json

    path = REPO / "InBrainSynSlicer.json"
    raw = path.read_bytes()
    assert b"\r" not in raw  # the index's check_json_file_format: LF line endings only
    entry = json.loads(raw)
    schema_properties = {  # key -> (type, allowed values or None), as in the v1.0.1 schema
        "$schema": (str, None), "category": (str, None), "scm_url": (str, None), "scm_revision": (str, None),
        "scm_type": (str, {"git", "local"}), "build_dependencies": (list, None), "build_subdirectory": (str, None),
        "enabled": (bool, None), "tier": (int, set(range(1, 6))),
    }
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= set(schema_properties), set(entry) - set(schema_properties)
    for key, value in entry.items():
        kind, allowed = schema_properties[key]
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), key
        if allowed is not None:
            assert value in allowed, (key, value)
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-v1.0.")
    # The index's own checks (scripts/check_description_files.py): the file name is the CMake project name,
    # the category is one it knows, scm_url is https or git.
    import re

    project = re.search(r"project\s*\(\s*([^\s)]+)", (REPO / "CMakeLists.txt").read_text()).group(1)
    assert path.stem == project
    assert entry["category"] == "Neuroimaging"
    assert entry["scm_url"].split("://")[0] in ("https", "git")
    # Agrees with the .s4ext (Slicer 5.6 and older indexes) and with CMake's EXTENSION_DEPENDS.
    s4ext = dict(line.split(" ", 1) for line in (REPO / "InBrainSynSlicer.s4ext").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert entry["scm_url"] == s4ext["scmurl"] and entry["scm_revision"] == s4ext["scmrevision"]
    assert entry["build_dependencies"] == s4ext["depends"].split() == ["PyTorch"]
    assert entry["category"] == s4ext["category"]
