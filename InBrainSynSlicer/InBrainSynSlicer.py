"""InBrainSyn: synthesise a patient's future brain MRI (healthy ageing or Alzheimer's disease) in 3D Slicer.

The module is a thin front end. The science runs in the ``inbrainsyn`` engine, started as a
background process (``inbrainsyn synthesize ... --json``) so the GUI never freezes; everything that
reads or builds MRML lives in ``InBrainSynSlicerLib`` (plain Python, tested outside Slicer with
PyPI ``slicer-core``, see Testing/slicer).
"""

import importlib
import logging
import os
import pathlib
import shutil
import tempfile
import time
import unittest
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

from InBrainSynSlicerLib import dependencies, engine, input_volume, layout, selftest, slicer_versions
from InBrainSynSlicerLib import runner as runner_lib
from InBrainSynSlicerLib import scene as scene_lib
from InBrainSynSlicerLib.manifest import ManifestError

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
        problem = slicerVersionProblem()
        if problem:
            self.parent.helpText += "\n" + problem


def slicerVersionProblem():
    """A sentence when this Slicer is older than the supported ones (README: supported versions), else None."""
    try:
        return slicer_versions.version_problem(slicer.app.majorVersion, slicer.app.minorVersion)
    except AttributeError:
        return None


#
# Parameter node
#


@parameterNodeWrapper
class InBrainSynSlicerParameterNode:
    """Every choice the user makes; saved with the scene.

    targetAges is text ("75, 80, 85") so that any number of ages can be typed.
    An empty templateBank or outputFolder means: the engine's default bank, and a new folder
    under Slicer's temporary folder. Both are plain text bound to their path fields by the widget
    (not pathlib.Path through the ctkPathLineEdit connector, which writes str(Path("")) == "." into an
    empty field). pace is the percentile of the cohort's ageing speed (50 = median, the engine's default).
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
    templateBank: str = ""
    outputFolder: str = ""
    replaceResults: bool = True
    pace: Annotated[int, WithinRange(engine.PACE_MIN, engine.PACE_MAX)] = engine.PACE_DEFAULT


# Path fields bound by hand (parameter name -> widget name in the .ui).
PATH_FIELDS = {"templateBank": "templateBankPathLineEdit", "outputFolder": "outputFolderPathLineEdit"}


def parameterWidgets(ui) -> dict:
    """SlicerParameterName -> widget, as ``connectGui`` collects them (wrapper.py, all supported versions)."""
    found = {}
    for widget in ui.__dict__.values():
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if name:
            found[name] = widget
    return found


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
        self._run = None  # runner_lib.Run while a synthesis, preview or installation is going
        self._afterInstall = None  # what to start once the dependencies are installed
        self._updatingPathFields = False
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
        for parameterName, widgetName in PATH_FIELDS.items():
            getattr(self.ui, widgetName).connect(
                "currentPathChanged(QString)", lambda text, name=parameterName: self._onPathFieldChanged(name, text))
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopProcess()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()

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

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNodeGuiTag = None

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the widgets to ``inputParameterNode``.

        connectParametersToGui, not connectGui: on Slicer 5.6 and 5.8 connectGui returns None
        (parameterNodeWrapper/wrapper.py; fixed in 5.10), so its connection could never be
        undone and every enter() would stack another one; the combo connectors clear and refill
        their combos when created, and the stale connection then wrote the first item (HC / pole /
        auto) back into the parameters. connectParametersToGui returns its tag on every version.
        """
        if (inputParameterNode is not None and self._parameterNodeGuiTag is not None
                and self._parameterNode is not None
                and self._parameterNode.parameterNode is inputParameterNode.parameterNode):
            self._updateGuiState()  # already connected to this node: connecting again would reset the combos
            return
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(parameterWidgets(self.ui))
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
            self._updateGuiState()

    # -- path fields (bound by hand: empty stays empty)

    def _onPathFieldChanged(self, parameterName, text) -> None:
        if self._parameterNode and not self._updatingPathFields:
            setattr(self._parameterNode, parameterName, runner_lib.path_text(text))

    def _updatePathFields(self) -> None:
        self._updatingPathFields = True
        try:
            for parameterName, widgetName in PATH_FIELDS.items():
                widget = getattr(self.ui, widgetName)
                value = runner_lib.path_text(getattr(self._parameterNode, parameterName))
                if runner_lib.path_text(widget.currentPath) != value:  # (leave the text being typed alone)
                    widget.currentPath = value
        finally:
            self._updatingPathFields = False

    # -- state of the buttons

    def _updateGuiState(self, caller=None, event=None) -> None:
        """Apply and Preview are enabled only when the choices can work and nothing is running."""
        running = self._run is not None or self.logic.runner.busy()
        problems = self.logic.problems(self._parameterNode) if self._parameterNode else ["No parameter node."]
        versionProblem = slicerVersionProblem()
        if versionProblem:
            problems = [versionProblem] + problems
        if self._parameterNode:
            self._updatePathFields()
        self.ui.conversionAgeSpinBox.enabled = bool(self._parameterNode and self._parameterNode.conversionEnabled)
        self.ui.applyButton.enabled = not running and not problems
        self.ui.previewButton.enabled = not running and not problems
        self.ui.installDependenciesButton.enabled = not running
        self.ui.cancelButton.enabled = running
        if running:
            kind = self._run.kind if self._run else "running"
            self.ui.statusLabel.text = "Installing dependencies..." if kind == "install" else "Running..."
        else:
            self.ui.statusLabel.text = "\n".join(problems) if problems else "Ready."
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else "Synthesise the target ages"

    # -- Apply / Preview / Cancel

    def onApplyButton(self) -> None:
        if self.logic.runner.busy():
            return  # the button is disabled while a run goes; the logic refuses too (RunAlreadyGoingError)
        if not self._ensureDependencies(then=self.onApplyButton):
            return
        try:
            run = self.logic.startSynthesis(self._parameterNode)
        except (engine.EngineMissingError, runner_lib.RunAlreadyGoingError, OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn")
            return
        self._startWatching(run)

    def onPreviewButton(self) -> None:
        if self.logic.runner.busy():
            return
        if not self._ensureDependencies(then=self.onPreviewButton):
            return
        try:
            sliceIndex = self.logic.currentAxialSlice(self._parameterNode.inputVolume)
            run = self.logic.startPreview(self._parameterNode, sliceIndex)
        except (engine.EngineMissingError, runner_lib.RunAlreadyGoingError, OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn")
            return
        self._startWatching(run)

    def onCancelButton(self) -> None:
        self._appendLog("Cancelling...")
        self._afterInstall = None
        if self._run is not None:
            self._run.process.cancel(grace_s=2.0)  # the timer then reports "cancelled"

    def _startWatching(self, run) -> None:
        self._run = run
        self.ui.logTextEdit.clear()
        self._appendLog(" ".join(run.process.argv))
        if run.kind == "install":
            self.ui.progressBar.setRange(0, 0)  # busy: pip reports no fraction
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self._timer.start()
        self._updateGuiState()

    def _stopProcess(self) -> None:
        if self._run is not None:
            self._run.process.cancel(grace_s=2.0)
            self.logic.runner.release(self._run)
        self._timer.stop()
        self._run = None
        if self._parameterNode:
            self._updateGuiState()

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _onEngineTimer(self) -> None:
        """Every 100 ms: show new events; when the process ended, load or report its outcome."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        for event in run.process.poll():
            kind = event.get("event")
            if kind == "progress":
                if run.kind != "install":
                    self.ui.progressBar.setValue(int(100 * float(event.get("fraction", 0.0))))
                    self.ui.progressBar.setFormat(f"{event.get('stage', '')}: %p%")
                if event.get("message"):
                    self._appendLog(f"[{event.get('stage', '')}] {event['message']}")
            elif kind in ("log", "error"):
                self._appendLog(str(event.get("message", "")))
        outcome = run.process.outcome()
        if outcome is None:
            return
        self._timer.stop()
        self._run = None
        self.logic.runner.release(run)
        self.ui.progressBar.hide()
        self.ui.progressBar.setRange(0, 100)
        afterInstall, self._afterInstall = self._afterInstall, None
        try:
            if outcome.succeeded and run.kind == "synthesize":
                try:
                    with slicer.util.tryWithErrorDisplay("InBrainSyn: could not show the results.", waitCursor=True):
                        self.logic.showResults(run, outcome.manifest)
                    self._appendLog(f"Results added from {outcome.manifest}")
                except Exception as exc:  # already shown to the user; the scene was rolled back
                    self._appendLog(f"Could not show the results: {exc}")
            elif outcome.succeeded and run.kind == "preview":
                self._showPreview(run, outcome.manifest)
            elif outcome.succeeded and run.kind == "install":
                importlib.invalidate_caches()
                self._appendLog("Dependencies installed.")
                if afterInstall is not None and not dependencies.missing_python_packages():
                    qt.QTimer.singleShot(0, afterInstall)  # continue with what the user asked for
            elif outcome.status == "cancelled":
                self._appendLog(outcome.message)
            else:
                self._appendLog(outcome.message)
                title = "InBrainSyn: installing dependencies failed" if run.kind == "install" else "InBrainSyn: the engine failed"
                slicer.util.errorDisplay(outcome.message, windowTitle=title)
        finally:
            self._updateGuiState()

    def _showPreview(self, run, manifestPath) -> None:
        try:
            images = self.logic.previewOutputs(run, manifestPath)
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

    def _ensureDependencies(self, force: bool = False, then=None) -> bool:
        """True when the engine can run now. Otherwise asks, starts the installation in the background
        (Apply and Preview disabled meanwhile) and returns False; ``then`` runs after a successful install."""
        if os.environ.get(engine.ENGINE_ENVIRONMENT_VARIABLE) and not force:
            return True  # an external engine is configured; Slicer's Python needs nothing
        if not force and not dependencies.missing_python_packages():
            return True
        try:
            plan, source = self.logic.installPlan(reinstallEngine=force)
        except (RuntimeError, OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn: install dependencies")
            return False
        if plan.problems:
            slicer.util.errorDisplay("\n".join(plan.problems), windowTitle="InBrainSyn: install dependencies")
            return False
        if plan.nothing_to_do:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "InBrainSyn needs to install Python packages into Slicer's Python. This needs a network connection "
            "and can take several minutes; Slicer stays usable meanwhile. Install now?",
            windowTitle="InBrainSyn: install dependencies",
            detailedText=plan.summary(),
        ):
            return False
        try:
            run = self.logic.startInstall(plan, source)
        except (RuntimeError, OSError, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="InBrainSyn: install dependencies")
            return False
        self._afterInstall = then
        self._startWatching(run)
        return False


#
# Logic
#


class InBrainSynSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable from the widget, the self-test or the Python console.

    One run at a time (``self.runner``): a second start while one is going raises
    RunAlreadyGoingError. Each run keeps the settings it was started with.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None
        self.runner = runner_lib.Runner(self.engineCommand, slicer.app.temporaryPath, slicer.mrmlScene)

    def getParameterNode(self):
        return InBrainSynSlicerParameterNode(super().getParameterNode())

    # -- checks

    def problems(self, p) -> list:
        """Why Apply cannot run with these choices (empty list: it can)."""
        return runner_lib.capture_settings(p).problems()

    # -- engine

    @staticmethod
    def pythonSlicerExecutable() -> str:
        return shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or ""

    def engineCommand(self) -> list:
        # PythonSlicer runs Slicer's own Python environment: look the engine up in-process (no probe process).
        return engine.find_engine(python_executable=self.pythonSlicerExecutable() or None, probe=False)

    def startSynthesis(self, p):
        """Capture the choices, export the input, start ``inbrainsyn synthesize`` in the background."""
        run = self.runner.start_synthesis(runner_lib.capture_settings(p))
        logging.info("InBrainSyn: started %s", " ".join(run.process.argv))
        return run

    def currentAxialSlice(self, volumeNode) -> int:
        """Slice index of ``volumeNode`` under the Red (axial) view's current position."""
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        sliceToRAS = sliceNode.GetSliceToRAS()
        center = [sliceToRAS.GetElement(r, 3) for r in range(3)]
        return input_volume.axial_slice_index(volumeNode, center)

    def startPreview(self, p, sliceIndex: int):
        """Start ``inbrainsyn daninet preview`` for one axial slice."""
        return self.runner.start_preview(runner_lib.capture_settings(p), sliceIndex)

    # -- results

    def previewOutputs(self, run, manifestPath):
        """A finished preview's pictures; its alignment is kept so the next preview of the same volume
        skips the registration (``Runner.preview_outputs``)."""
        return self.runner.preview_outputs(run, manifestPath)

    def showResults(self, run, manifestPath):
        """Add one finished run's results to the scene (all or nothing), filed under the input volume and
        replace-option the run was started with, and show them side by side."""
        return self._show(self.runner.load_results(run, manifestPath), run.settings)

    def _show(self, result, settings):
        self.lastResult = result
        left = result.baseline or settings.input_node
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
        settings = runner_lib.capture_settings(p)
        result = self.runner.run_to_end(settings, on_event=onEvent, timeout_s=timeout_s,
                                        process_events=slicer.app.processEvents)
        return self._show(result, settings)

    # -- dependencies

    def installPlan(self, reinstallEngine: bool = False):
        """What installing would do (nothing is installed yet): (dependencies.InstallPlan, engine source folder)."""
        source = dependencies.engine_source_dir(MODULE_DIR)
        if source is None:
            raise RuntimeError(f"The InBrainSyn engine source was not found next to {MODULE_DIR}; reinstall the extension.")
        missing = dependencies.missing_python_packages()
        plan = dependencies.make_install_plan(
            dependencies.read_engine_requirements(source), torch_installed="torch" not in missing,
            engine_installed="inbrainsyn" not in missing, reinstall_engine=reinstallEngine)
        return plan, source

    def torchInstallArguments(self, torchRequirement: str):
        """The light-the-torch arguments PyTorchUtils uses for ``torch<torchRequirement>`` (the engine's minimum),
        or None when this PyTorchUtils cannot tell (then installTorch runs in the foreground)."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                "InBrainSyn needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, then try again."
            ) from None
        getter = getattr(PyTorchUtils.PyTorchUtilsLogic, "_getPipInstallArguments", None)
        if getter is None:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=torchRequirement)
            if torch is None:
                raise RuntimeError("PyTorch could not be installed; see the PyTorch module for details.")
            return None
        return list(getter(None, torchRequirement or None))

    def startInstall(self, plan, source):
        """Start the installation in the background (one command after the other); returns the Run."""
        torchArgs = self.torchInstallArguments(plan.torch_requirement) if plan.torch_requirement is not None else None
        python = self.pythonSlicerExecutable()
        if not python:
            raise RuntimeError("PythonSlicer was not found; is this running inside 3D Slicer?")
        constraints = pathlib.Path(slicer.app.temporaryPath) / "InBrainSyn" / "bundled-constraints.txt"
        commands = dependencies.install_commands(plan, python, source, constraints, torch_args=torchArgs)
        run = self.runner.start_job(dependencies.CommandChain(commands), kind="install")
        logging.info("InBrainSyn: installing dependencies: %s", run.process.argv[0])
        return run


#
# Test
#


class InBrainSynSlicerTest(ScriptedLoadableModuleTest):
    """The module inside Slicer: input checks, then the real engine on a small demo subject.

    The engine part is skipped, saying why, when the engine or torch is not installed in Slicer's
    Python (e.g. in an extension build's CTest before 'Install dependencies').
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bad_inputs_disable_apply()
        reason = selftest.engine_missing_reason()
        if reason:
            self.delayDisplay(f"InBrainSyn self-test: engine part skipped: {reason}")
            raise unittest.SkipTest(reason)
        self.setUp()
        self.test_cancel_leaves_the_scene_unchanged()
        self.setUp()
        self.test_full_flow_on_the_demo_subject()

    # -- helpers

    @staticmethod
    def syntheticVolume(name="synthetic T1"):
        """A small ellipsoid: enough for the input checks (not for the engine)."""
        import numpy as np

        z, y, x = np.mgrid[0:30, 0:36, 0:32].astype(np.float32)
        r2 = ((x - 15.5) / 13) ** 2 + ((y - 17.5) / 16) ** 2 + ((z - 14.5) / 12) ** 2
        node = slicer.util.addVolumeFromArray(np.where(r2 <= 1, 80.0, 0.0).astype(np.float32), name=name)
        node.SetSpacing(5.0, 5.0, 5.0)
        return node

    def demoVolume(self, name="demo subject"):
        """The engine's demo subject at 3 mm (InBrainSynSlicerLib.selftest)."""
        folder = pathlib.Path(tempfile.mkdtemp(prefix="InBrainSynSelfTest-", dir=slicer.app.temporaryPath))
        node = slicer.util.loadVolume(str(selftest.write_small_demo_subject(folder / "subject_3mm.nii.gz")))
        node.SetName(name)
        return node

    def parameters(self, volume):
        logic = InBrainSynSlicerLogic()
        p = logic.getParameterNode()
        p.inputVolume = volume
        p.age = selftest.DEMO_AGE
        p.cohort = "HC"
        p.targetAges = "75, 80"
        p.conversionEnabled = False
        p.replaceResults = True
        p.templateBank = ""
        p.outputFolder = ""
        p.pace = engine.PACE_DEFAULT
        p.device = "cpu"
        return logic, p

    # -- tests

    def test_bad_inputs_disable_apply(self):
        logic, p = self.parameters(self.syntheticVolume())
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
        self.assertFalse(logic.runner.busy())

    def test_cancel_leaves_the_scene_unchanged(self):
        logic, p = self.parameters(self.demoVolume())
        before = slicer.mrmlScene.GetNumberOfNodes()
        run = logic.startSynthesis(p)
        with self.assertRaises(runner_lib.RunAlreadyGoingError):
            logic.startSynthesis(p)  # one run at a time
        slicer.app.processEvents()
        run.process.cancel()
        outcome = run.process.wait(timeout=30)
        logic.runner.release(run)
        self.assertEqual(outcome.status, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_full_flow_on_the_demo_subject(self):
        import numpy as np

        volume = self.demoVolume()
        other = self.demoVolume("other volume")
        original = slicer.util.arrayFromVolume(volume).copy()
        logic, p = self.parameters(volume)
        self.delayDisplay("Running InBrainSyn on the demo subject at 3 mm (about a minute on CPU)")
        result = logic.runSynthesisBlocking(p, onEvent=lambda e: logging.info("InBrainSyn: %s", e))
        self.assertEqual(sorted(result.synthetic), [75.0, 80.0])
        self.assertEqual(result.sequence.GetIndexName(), "age")
        self.assertEqual(result.sequence.GetNumberOfDataNodes(), 3)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), original)  # input untouched
        composite = slicer.app.layoutManager().sliceWidget("Yellow").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), result.synthetic_proxy.GetID())
        # A second run with "replace", while the selector moves to another volume and "replace" is unticked:
        # the results still belong to the run's own volume and replace its earlier ones.
        run = logic.startSynthesis(p)
        p.inputVolume = other
        p.replaceResults = False
        while run.process.is_running():
            run.process.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        outcome = run.process.wait()
        logic.runner.release(run)
        self.assertTrue(outcome.succeeded, outcome.message)
        logic.showResults(run, outcome.manifest)
        self.assertEqual(len(scene_lib.find_result_folders(slicer.mrmlScene, volume)), 1)
        self.assertEqual(len(scene_lib.find_result_folders(slicer.mrmlScene, other)), 0)
        self.delayDisplay("InBrainSyn self-test passed")
