"""InBrainSyn: synthesise a patient's future brain MRI (healthy ageing or Alzheimer's disease) in 3D Slicer.

The module is a thin front end. The science runs in the ``inbrainsyn`` engine, started as a
background process (``inbrainsyn synthesize ... --json``) so the GUI never freezes; everything that
reads or builds MRML lives in ``InBrainSynSlicerLib`` (plain Python, tested outside Slicer with
PyPI ``slicer-core``, see Testing/slicer).
"""

import logging
import os
import pathlib
import shutil
import time
from typing import Annotated

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode

from InBrainSynSlicerLib import dependencies, engine, input_volume, layout
from InBrainSynSlicerLib import scene as scene_lib
from InBrainSynSlicerLib.manifest import ManifestError, read_preview_outputs

MODULE_DIR = pathlib.Path(__file__).resolve().parent


#
# Module
#


class InBrainSynSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "InBrainSyn"
        self.parent.categories = ["Neuroimaging"]
        self.parent.dependencies = []
        self.parent.contributors = ["InBrainSyn-Slicer developers"]
        self.parent.helpText = """
Synthesise a patient's future T1-weighted brain MRI from one scan, for healthy ageing (HC) or
Alzheimer's disease (AD), optionally converting from HC to AD at a chosen age (InBrainSyn:
parallel transport of template ageing deformations). Results: one volume per target age, a
sequence to scrub from baseline to the last age, a side-by-side view with the Jacobian
(local volume change) overlay, and a table and plot of regional volumes.
Research use only: synthetic images are not a diagnosis.
"""
        self.parent.acknowledgementText = """
Method: Fu et al., InBrainSyn, Medical Image Analysis 2025. Slice preview: DaniNet (Ravi et al.,
MICCAI 2019 / MedIA 2022). Built with 3D Slicer and PyTorch.
"""


#
# Parameter node
#


@parameterNodeWrapper
class InBrainSynSlicerParameterNode:
    """Every choice the user makes; saved with the scene.

    targetAges is text ("75, 80, 85") so that any number of ages can be typed.
    An empty templateBank or outputFolder means: the engine's default bank, and a new folder
    under Slicer's temporary folder.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    age: Annotated[float, WithinRange(0.0, 120.0)] = 70.0
    cohort: Annotated[str, Choice(list(engine.COHORTS))] = "HC"
    targetAges: str = "75, 80, 85"
    conversionEnabled: bool = False
    conversionAge: Annotated[float, WithinRange(0.0, 120.0)] = 78.0
    transportMethod: Annotated[str, Choice(list(engine.TRANSPORT_METHODS))] = "pole"
    device: Annotated[str, Choice(list(engine.DEVICES))] = "auto"
    skullStripped: bool = False
    templateBank: pathlib.Path
    outputFolder: pathlib.Path
    replaceResults: bool = True


def _pathOrNone(path) -> str:
    text = str(path) if path is not None else ""
    return "" if text in ("", ".") else text


#
# Widget
#


class InBrainSynSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Reads the parameter node, starts the engine through the logic, shows progress and messages."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None  # engine.EngineProcess while a run is going
        self._processKind = None  # "synthesize" or "preview"
        self._runFolder = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._onEngineTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/InBrainSynSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = InBrainSynSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.previewButton.connect("clicked(bool)", self.onPreviewButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopProcess()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopProcess()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
            self._updateGuiState()

    # -- state of the buttons

    def _updateGuiState(self, caller=None, event=None) -> None:
        """Apply and Preview are enabled only when the choices can work; the status says why not."""
        running = self._process is not None
        problems = self.logic.problems(self._parameterNode) if self._parameterNode else ["No parameter node."]
        self.ui.conversionAgeSpinBox.enabled = bool(self._parameterNode and self._parameterNode.conversionEnabled)
        self.ui.applyButton.enabled = not running and not problems
        self.ui.previewButton.enabled = not running and not problems
        self.ui.cancelButton.enabled = running
        self.ui.statusLabel.text = "\n".join(problems) if problems else ("Running..." if running else "Ready.")
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else "Synthesise the target ages"

    # -- Apply / Preview / Cancel

    def onApplyButton(self) -> None:
        if not self._ensureDependencies():
            return
        try:
            self._process, self._runFolder = self.logic.startSynthesis(self._parameterNode)
        except (engine.EngineMissingError, OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn")
            return
        self._startWatching("synthesize")

    def onPreviewButton(self) -> None:
        if not self._ensureDependencies():
            return
        try:
            sliceIndex = self.logic.currentAxialSlice(self._parameterNode.inputVolume)
            self._process, self._runFolder = self.logic.startPreview(self._parameterNode, sliceIndex)
        except (engine.EngineMissingError, OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn")
            return
        self._startWatching("preview")

    def onCancelButton(self) -> None:
        self._appendLog("Cancelling...")
        if self._process is not None:
            self._process.cancel(grace_s=2.0)  # the timer then reports "cancelled"

    def _startWatching(self, kind: str) -> None:
        self._processKind = kind
        self.ui.logTextEdit.clear()
        self._appendLog(" ".join(self._process.argv))
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self._timer.start()
        self._updateGuiState()

    def _stopProcess(self) -> None:
        if self._process is not None:
            self._process.cancel(grace_s=2.0)
        self._timer.stop()
        self._process = None
        if self._parameterNode:
            self._updateGuiState()

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _onEngineTimer(self) -> None:
        """Every 100 ms: show new events; when the process ended, load or report its outcome."""
        process = self._process
        if process is None:
            self._timer.stop()
            return
        for event in process.poll():
            kind = event.get("event")
            if kind == "progress":
                self.ui.progressBar.setValue(int(100 * float(event.get("fraction", 0.0))))
                self.ui.progressBar.setFormat(f"{event.get('stage', '')}: %p%")
                if event.get("message"):
                    self._appendLog(f"[{event.get('stage', '')}] {event['message']}")
            elif kind in ("log", "error"):
                self._appendLog(str(event.get("message", "")))
        outcome = process.outcome()
        if outcome is None:
            return
        self._timer.stop()
        self._process = None
        self.ui.progressBar.hide()
        try:
            if outcome.succeeded and self._processKind == "synthesize":
                try:
                    with slicer.util.tryWithErrorDisplay("InBrainSyn: could not show the results.", waitCursor=True):
                        self.logic.showResults(outcome.manifest, self._parameterNode)
                    self._appendLog(f"Results added from {outcome.manifest}")
                except Exception as exc:  # already shown to the user; the scene was rolled back
                    self._appendLog(f"Could not show the results: {exc}")
            elif outcome.succeeded and self._processKind == "preview":
                self._showPreview(outcome.manifest)
            elif outcome.status == "cancelled":
                self._appendLog(outcome.message)
            else:
                self._appendLog(outcome.message)
                slicer.util.errorDisplay(outcome.message, windowTitle="InBrainSyn: the engine failed")
        finally:
            self._updateGuiState()

    def _showPreview(self, manifestPath) -> None:
        try:
            images = read_preview_outputs(manifestPath)
        except ManifestError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn preview")
            return
        picture = images["strip"] or next(iter(images["slices"].values()))
        pixmap = qt.QPixmap(str(picture))
        width = max(200, self.ui.previewImageLabel.width)
        self.ui.previewImageLabel.setPixmap(pixmap.scaledToWidth(width, qt.Qt.SmoothTransformation))
        self.ui.previewImageLabel.toolTip = str(picture)
        self._appendLog(f"Preview: {picture}")

    # -- dependencies

    def onInstallDependencies(self) -> None:
        self._ensureDependencies(force=True)

    def _ensureDependencies(self, force: bool = False) -> bool:
        missing = dependencies.missing_python_packages()
        if os.environ.get(engine.ENGINE_ENVIRONMENT_VARIABLE):
            missing = []  # an external engine is configured; Slicer's Python needs nothing
        if not missing and not force:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "InBrainSyn needs " + (", ".join(missing) if missing else "its engine (re)installed")
            + " in Slicer's Python. PyTorch is installed by the PyTorch extension (it picks the CPU or "
            "CUDA build for this computer), the engine from this extension's folder. "
            "This can take several minutes. Install now?",
            windowTitle="InBrainSyn: install dependencies",
        ):
            return False
        try:
            with slicer.util.tryWithErrorDisplay("InBrainSyn: installing dependencies failed.", waitCursor=True):
                self.logic.installDependencies(reinstallEngine=force)
        except Exception:
            return False
        self._updateGuiState()
        return not dependencies.missing_python_packages()


#
# Logic
#


class InBrainSynSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable from the widget, the self-test or the Python console."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None

    def getParameterNode(self):
        return InBrainSynSlicerParameterNode(super().getParameterNode())

    # -- checks

    def problems(self, p) -> list:
        """Why Apply cannot run with these choices (empty list: it can)."""
        problems = input_volume.input_volume_problems(p.inputVolume)
        try:
            targets = engine.parse_target_ages(p.targetAges)
        except ValueError as exc:
            return problems + [str(exc)]
        problems += engine.check_ages(p.age, p.cohort, targets, p.conversionEnabled, p.conversionAge)
        bank = _pathOrNone(p.templateBank)
        if bank and not pathlib.Path(bank).exists():
            problems.append(f"Template bank {bank} does not exist; clear the field to use the default bank.")
        return problems

    # -- engine

    @staticmethod
    def pythonSlicerExecutable() -> str:
        return shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or ""

    def engineCommand(self) -> list:
        return engine.find_engine(python_executable=self.pythonSlicerExecutable() or None)

    def _newRunFolder(self, p, kind: str) -> pathlib.Path:
        base = _pathOrNone(p.outputFolder) or os.path.join(slicer.app.temporaryPath, "InBrainSyn")
        return engine.output_folder_for(base, f"{p.inputVolume.GetName()}-{kind}")

    def _request(self, p, runFolder: pathlib.Path) -> engine.SynthesisRequest:
        inputPath = input_volume.export_input_volume(p.inputVolume, runFolder / "input.nii.gz")
        return engine.SynthesisRequest(
            input_path=str(inputPath),
            age=float(p.age),
            cohort=p.cohort,
            targets=tuple(engine.parse_target_ages(p.targetAges)),
            output_dir=str(runFolder / "output"),
            transition_age=float(p.conversionAge) if p.conversionEnabled else None,
            method=p.transportMethod,
            device=p.device,
            bank=_pathOrNone(p.templateBank) or None,
            skull_stripped=bool(p.skullStripped),
        )

    def startSynthesis(self, p):
        """Export the input, start ``inbrainsyn synthesize`` in the background; returns (process, folder)."""
        problems = self.problems(p)
        if problems:
            raise ValueError("\n".join(problems))
        command = self.engineCommand()
        runFolder = self._newRunFolder(p, "synthesis")
        request = self._request(p, runFolder)
        process = engine.EngineProcess(engine.synthesize_argv(command, request)).start()
        logging.info("InBrainSyn: started %s", " ".join(process.argv))
        return process, runFolder

    def currentAxialSlice(self, volumeNode) -> int:
        """Slice index of ``volumeNode`` under the Red (axial) view's current position."""
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        sliceToRAS = sliceNode.GetSliceToRAS()
        center = [sliceToRAS.GetElement(r, 3) for r in range(3)]
        return input_volume.axial_slice_index(volumeNode, center)

    def startPreview(self, p, sliceIndex: int):
        """Start ``inbrainsyn daninet preview`` for one axial slice; returns (process, folder)."""
        problems = self.problems(p)
        if problems:
            raise ValueError("\n".join(problems))
        command = self.engineCommand()
        runFolder = self._newRunFolder(p, "preview")
        inputPath = input_volume.export_input_volume(p.inputVolume, runFolder / "input.nii.gz")
        argv = engine.preview_argv(command, str(inputPath), p.age, p.cohort, engine.parse_target_ages(p.targetAges),
                                   sliceIndex, str(runFolder / "output"))
        process = engine.EngineProcess(argv, expected_manifest=str(runFolder / "output" / "manifest.json"))
        return process.start(), runFolder

    # -- results

    def showResults(self, manifestPath, p):
        """Add one run's results to the scene (all or nothing) and show them side by side."""
        result = scene_lib.load_results_into_scene(
            slicer.mrmlScene, manifestPath, input_node=p.inputVolume, replace=bool(p.replaceResults)
        )
        self.lastResult = result
        left = result.baseline or p.inputVolume
        layout.show_side_by_side(slicer.mrmlScene, left, result.synthetic_proxy, result.jacobian_proxy, result.chart)
        slicer.util.resetSliceViews()
        try:
            slicer.modules.sequences.setToolBarActiveBrowserNode(result.browser)
            slicer.modules.sequences.toolBar().setVisible(True)
        except AttributeError:  # older Slicer: the browser is still in the Sequences module
            pass
        return result

    def runSynthesisBlocking(self, p, onEvent=None, timeout_s: float = 1800.0):
        """Run the engine to the end and show the results (for scripts and the self-test)."""
        process, _ = self.startSynthesis(p)
        deadline = time.monotonic() + timeout_s
        while process.is_running():
            for event in process.poll():
                if onEvent:
                    onEvent(event)
            if time.monotonic() > deadline:
                process.cancel()
                raise RuntimeError(f"the engine did not finish in {timeout_s:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.05)
        outcome = process.wait()
        if not outcome.succeeded:
            raise RuntimeError(outcome.message)
        return self.showResults(outcome.manifest, p)

    # -- dependencies

    def installDependencies(self, reinstallEngine: bool = False) -> None:
        """torch through the PyTorch extension, then the engine from this extension's folder."""
        if "torch" in dependencies.missing_python_packages():
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    "InBrainSyn needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                    "restart Slicer, then try again."
                ) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=False) is None:
                raise RuntimeError("PyTorch could not be installed; see the PyTorch module for details.")
        if reinstallEngine or "inbrainsyn" in dependencies.missing_python_packages():
            source = dependencies.engine_source_dir(MODULE_DIR)
            if source is None:
                raise RuntimeError(f"The InBrainSyn engine source was not found next to {MODULE_DIR}; reinstall the extension.")
            slicer.util.pip_install(["--upgrade", str(source)])


#
# Test
#


class InBrainSynSlicerTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on a small phantom volume (needs the engine installed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bad_inputs_disable_apply()
        self.setUp()
        self.test_cancel_leaves_the_scene_unchanged()
        self.setUp()
        self.test_full_flow_on_a_phantom()

    # -- helpers

    @staticmethod
    def phantomVolume(name="phantom T1"):
        """64 x 72 x 60 voxels, 2.5 mm: an ellipsoidal brain (grey/white) with two ventricles."""
        import numpy as np

        z, y, x = np.mgrid[0:60, 0:72, 0:64].astype(np.float32)
        cz, cy, cx = 29.5, 35.5, 31.5
        r2 = ((x - cx) / 26) ** 2 + ((y - cy) / 32) ** 2 + ((z - cz) / 24) ** 2
        array = np.where(r2 <= 1, 0.55, 0.0).astype(np.float32)
        array[r2 <= 0.6] = 0.8  # white matter
        for side in (-1, 1):
            vent = ((x - cx - 5 * side) / 3) ** 2 + ((y - cy) / 9) ** 2 + ((z - cz - 2) / 5) ** 2 <= 1
            array[vent] = 0.15
        node = slicer.util.addVolumeFromArray(array * 100.0, ijkToRAS=None, name=name)
        node.SetSpacing(2.5, 2.5, 2.5)
        node.SetOrigin(-80.0, -90.0, -75.0)
        return node

    def parameters(self, volume):
        logic = InBrainSynSlicerLogic()
        p = logic.getParameterNode()
        p.inputVolume = volume
        p.age = 70.0
        p.cohort = "HC"
        p.targetAges = "75, 80"
        p.conversionEnabled = False
        p.replaceResults = True
        return logic, p

    # -- tests

    def test_bad_inputs_disable_apply(self):
        logic, p = self.parameters(self.phantomVolume())
        self.assertEqual(logic.problems(p), [])
        p.targetAges = "65"
        self.assertTrue(any("not after" in m for m in logic.problems(p)))
        p.targetAges = "75"
        p.age = 20.0
        self.assertTrue(any("outside the range" in m for m in logic.problems(p)))
        p.age = 70.0
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        p.inputVolume = None
        self.assertTrue(logic.problems(p))
        self.assertTrue(input_volume.input_volume_problems(label))
        flat = slicer.util.addVolumeFromArray(__import__("numpy").zeros((1, 64, 64), "float32"), name="2D")
        self.assertTrue(any("2D" in m for m in input_volume.input_volume_problems(flat)))
        with self.assertRaises(ValueError):
            logic.startSynthesis(p)

    def test_cancel_leaves_the_scene_unchanged(self):
        logic, p = self.parameters(self.phantomVolume())
        before = slicer.mrmlScene.GetNumberOfNodes()
        process, _ = logic.startSynthesis(p)
        time.sleep(1.0)
        process.cancel()
        outcome = process.wait(timeout=30)
        self.assertIn(outcome.status, ("cancelled", "succeeded"))  # a very fast engine may finish first
        if outcome.status == "cancelled":
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_full_flow_on_a_phantom(self):
        import numpy as np

        volume = self.phantomVolume()
        original = slicer.util.arrayFromVolume(volume).copy()
        logic, p = self.parameters(volume)
        self.delayDisplay("Running InBrainSyn on the phantom (this takes a while on CPU)")
        result = logic.runSynthesisBlocking(p, onEvent=lambda e: logging.info("InBrainSyn: %s", e))
        self.assertEqual(sorted(result.synthetic), [75.0, 80.0])
        self.assertEqual(result.sequence.GetIndexName(), "age")
        self.assertEqual(result.sequence.GetNumberOfDataNodes(), 3)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), original)  # input untouched
        composite = slicer.app.layoutManager().sliceWidget("Yellow").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), result.synthetic_proxy.GetID())
        # Running again with "replace" keeps one result folder for this input.
        logic.runSynthesisBlocking(p)
        self.assertEqual(len(scene_lib.find_result_folders(slicer.mrmlScene, volume)), 1)
        self.delayDisplay("InBrainSyn self-test passed")
