"""One engine run at a time, with the settings it was started with.

Plain Python on MRML (tested with slicer-core and the real engine). The module's logic delegates
here, so what the widget, the self-test and the Python console do is the same code:

* :func:`capture_settings` copies every choice off the parameter node when Apply is pressed
  (:class:`RunSettings`): the results are filed under *that* input volume with *that*
  replace-option, whatever the selectors show when the run ends;
* :class:`Runner` refuses a second run (synthesis, preview or dependency installation) while one
  is going (:class:`RunAlreadyGoingError`); the widget disables Apply and Preview meanwhile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import engine
from . import input_volume
from . import manifest as manifest_lib
from . import scene as scene_lib


class RunAlreadyGoingError(RuntimeError):
    """Apply or Preview while a run (or the dependency installation) is still going."""


def path_text(value) -> str:
    """A path field's text: "" for no path (never "."; ``str(pathlib.Path(""))`` is ".")."""
    text = "" if value is None else str(value).strip()
    return "" if text in ("", ".") else text


@dataclass(frozen=True)
class RunSettings:
    """Every choice of one run, captured when it starts (never read again from the GUI)."""

    input_node: object
    age: float
    cohort: str
    target_ages_text: str
    conversion_enabled: bool = False
    conversion_age: float = 78.0
    transport_method: str = "pole"
    device: str = "auto"
    skull_stripped: bool = False
    template_bank: str = ""
    output_folder: str = ""
    replace_results: bool = True
    pace: int = engine.PACE_DEFAULT

    def targets(self) -> list:
        return engine.parse_target_ages(self.target_ages_text)

    def problems(self) -> list:
        """Why these settings cannot run (empty list: they can)."""
        problems = input_volume.input_volume_problems(self.input_node)
        try:
            targets = self.targets()
        except ValueError as exc:
            return problems + [str(exc)]
        problems += engine.check_ages(self.age, self.cohort, targets, self.conversion_enabled, self.conversion_age)
        if not engine.PACE_MIN <= int(self.pace) <= engine.PACE_MAX:
            problems.append(f"Pace {self.pace} is outside {engine.PACE_MIN}-{engine.PACE_MAX} (percentile; 50 = the cohort's median).")
        bank = path_text(self.template_bank)
        if bank and not Path(bank).exists():
            problems.append(f"Template bank {bank} does not exist; clear the field to use the default bank.")
        return problems


def capture_settings(p) -> RunSettings:
    """Copy the parameter node's values (``InBrainSynSlicerParameterNode`` or any object with its fields)."""
    return RunSettings(
        input_node=p.inputVolume,
        age=float(p.age),
        cohort=str(p.cohort),
        target_ages_text=str(p.targetAges),
        conversion_enabled=bool(p.conversionEnabled),
        conversion_age=float(p.conversionAge),
        transport_method=str(p.transportMethod),
        device=str(p.device),
        skull_stripped=bool(p.skullStripped),
        template_bank=path_text(p.templateBank),
        output_folder=path_text(p.outputFolder),
        replace_results=bool(p.replaceResults),
        pace=int(getattr(p, "pace", engine.PACE_DEFAULT)),
    )


def input_stamp(node) -> tuple:
    """What the exported input is made of: the node's ID, its voxels' modification time and its
    IJK-to-RAS matrix. An alignment stays valid for a volume while its stamp is unchanged."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    image = node.GetImageData()
    return (node.GetID(), image.GetMTime() if image is not None else -1,
            tuple(round(matrix.GetElement(i, j), 9) for i in range(4) for j in range(4)))


@dataclass
class Run:
    """A started run: its kind ("synthesize", "preview" or "install"), settings, folder and process."""

    kind: str
    process: object  # engine.EngineProcess or dependencies.CommandChain
    settings: RunSettings | None = None
    folder: Path | None = None
    input_stamp: tuple | None = None  # the input as exported for this run (input_stamp)


class Runner:
    """Starts runs one at a time and files their results under the run's own settings."""

    def __init__(self, engine_command, temporary_dir, scene=None):
        """``engine_command()``: the engine's command prefix (may raise EngineMissingError);
        ``temporary_dir``: the default output base (Slicer's temporary folder);
        ``scene``: the MRML scene results go into (``slicer.mrmlScene`` in the desktop)."""
        self.engine_command = engine_command
        self.temporary_dir = str(temporary_dir)
        self.scene = scene
        self.active: Run | None = None
        # node ID -> (manifest of a finished run that recorded its affine, the input's stamp then):
        # later previews of an unchanged volume reuse that alignment instead of registering again
        self._alignments: dict = {}

    # -- the guard
    def busy(self) -> bool:
        return self.active is not None

    def _claim(self, kind: str) -> None:
        if self.active is not None:
            raise RunAlreadyGoingError(
                f"InBrainSyn is still busy ({self.active.kind}); wait until it ends or press Cancel before starting {kind}.")

    def release(self, run: Run) -> None:
        """The widget (or run_to_end) collected ``run``'s outcome: the next run may start."""
        if self.active is run:
            self.active = None

    # -- starting
    def _run_folder(self, settings: RunSettings, kind: str) -> Path:
        base = path_text(settings.output_folder) or os.path.join(self.temporary_dir, "InBrainSyn")
        return engine.output_folder_for(base, f"{settings.input_node.GetName()}-{kind}")

    def _export(self, settings: RunSettings, folder: Path) -> Path:
        # Uncompressed: the write happens on Slicer's GUI thread (MRML is not thread-safe) and gzip
        # would take seconds for a 1 mm volume; .nii takes a fraction of that.
        return input_volume.export_input_volume(settings.input_node, folder / "input.nii", compress=False)

    def request_for(self, settings: RunSettings, input_path: Path, output_dir: Path) -> engine.SynthesisRequest:
        return engine.SynthesisRequest(
            input_path=str(input_path),
            age=float(settings.age),
            cohort=settings.cohort,
            targets=tuple(settings.targets()),
            output_dir=str(output_dir),
            transition_age=float(settings.conversion_age) if settings.conversion_enabled else None,
            method=settings.transport_method,
            device=settings.device,
            bank=path_text(settings.template_bank) or None,
            skull_stripped=bool(settings.skull_stripped),
            pace=int(settings.pace),
        )

    def start_synthesis(self, settings: RunSettings) -> Run:
        """Export the input and start ``inbrainsyn synthesize`` in the background."""
        self._claim("a synthesis")
        problems = settings.problems()
        if problems:
            raise ValueError("\n".join(problems))
        command = self.engine_command()
        folder = self._run_folder(settings, "synthesis")
        stamp = input_stamp(settings.input_node)
        request = self.request_for(settings, self._export(settings, folder), folder / "output")
        process = engine.EngineProcess(engine.synthesize_argv(command, request)).start()
        self.active = Run("synthesize", process, settings, folder, stamp)
        return self.active

    def start_preview(self, settings: RunSettings, slice_index: int) -> Run:
        """Start ``inbrainsyn daninet preview`` for one axial slice of the input."""
        self._claim("a preview")
        problems = settings.problems()
        if problems:
            raise ValueError("\n".join(problems))
        command = self.engine_command()
        folder = self._run_folder(settings, "preview")
        stamp = input_stamp(settings.input_node)
        input_path = self._export(settings, folder)
        argv = engine.preview_argv(command, str(input_path), settings.age, settings.cohort, settings.targets(),
                                   slice_index, str(folder / "output"), alignment=self.alignment_for(stamp))
        process = engine.EngineProcess(argv, expected_manifest=str(folder / "output" / "manifest.json")).start()
        self.active = Run("preview", process, settings, folder, stamp)
        return self.active

    # -- alignments kept between runs
    def alignment_for(self, stamp: tuple) -> str | None:
        """The manifest of an earlier run of this very input (same stamp) that recorded its affine, or None."""
        kept = self._alignments.get(stamp[0])
        if kept is None or kept[1] != stamp or not Path(kept[0]).is_file():
            return None
        return kept[0]

    def remember_alignment(self, run: Run, manifest_path) -> None:
        """Keep a finished run's alignment for the next previews of the same, unchanged input."""
        if run.settings is not None and path_text(run.settings.template_bank):
            return  # an affine to another bank's template is not the preview model's grid
        if run.input_stamp is not None and manifest_lib.has_alignment(manifest_path):
            self._alignments[run.input_stamp[0]] = (str(Path(manifest_path).resolve()), run.input_stamp)

    def preview_outputs(self, run: Run, manifest_path) -> dict:
        """A finished preview's pictures (``manifest.read_preview_outputs``); its alignment is kept."""
        images = manifest_lib.read_preview_outputs(manifest_path)
        self.remember_alignment(run, manifest_path)
        return images

    def start_job(self, job, kind: str = "install") -> Run:
        """Start a background job that is not the engine (the dependency installation, a
        ``dependencies.CommandChain``) as the active run, so nothing else starts meanwhile."""
        self._claim(kind)
        self.active = Run(kind, job.start())
        return self.active

    # -- results
    def load_results(self, run: Run, manifest_path):
        """Add a finished synthesis to the scene under the run's own input node and replace-option
        (its alignment is kept for later previews of the same input)."""
        self.remember_alignment(run, manifest_path)
        return scene_lib.load_results_into_scene(
            self.scene, manifest_path, input_node=run.settings.input_node, replace=bool(run.settings.replace_results))

    def run_to_end(self, settings: RunSettings, on_event=None, timeout_s: float = 1800.0, process_events=None):
        """Start a synthesis, wait for it, load its results (scripts and the self-test)."""
        run = self.start_synthesis(settings)
        try:
            deadline = time.monotonic() + timeout_s
            while run.process.is_running():
                for event in run.process.poll():
                    if on_event:
                        on_event(event)
                if time.monotonic() > deadline:
                    run.process.cancel()
                    raise RuntimeError(f"the engine did not finish in {timeout_s:.0f} s")
                if process_events:
                    process_events()
                time.sleep(0.05)
            for event in run.process.poll():
                if on_event:
                    on_event(event)
            outcome = run.process.wait()
        finally:
            self.release(run)
        if not outcome.succeeded:
            raise RuntimeError(outcome.message)
        return self.load_results(run, outcome.manifest)

