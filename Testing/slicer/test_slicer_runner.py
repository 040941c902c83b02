"""One run at a time, filed under its own settings; process trees end on Cancel; background installs.

Runs the module's runner (InBrainSynSlicerLib.runner) on Slicer's real MRML (slicer-core) with the
stand-in engine process (fake_inbrainsyn.py); the real engine is in test_slicer_self_test.py.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path
import time
from types import SimpleNamespace

import pytest

from InBrainSynSlicerLib import dependencies, engine, runner as runner_lib
from InBrainSynSlicerLib import scene as scene_lib


def parameters(volume, **changes):
    """An object with the parameter node's fields (what capture_settings reads)."""
    values = dict(inputVolume=volume, age=70.0, cohort="HC", targetAges="75, 80", conversionEnabled=False,
                  conversionAge=78.0, transportMethod="pole", device="cpu", skullStripped=False, templateBank="",
                  outputFolder="", replaceResults=True, pace=50)
    values.update(changes)
    return SimpleNamespace(**values)


def big_volume(scene, name):
    """A 24 x 26 x 22 non-constant scalar volume (what the input checks accept)."""
    import numpy as np
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(24, 26, 22)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    scalars = image.GetPointData().GetScalars()
    scalars.FillComponent(0, 0.0)
    for i, v in enumerate(np.random.default_rng(0).uniform(0, 100, 50)):
        scalars.SetValue(i, v)
    node.SetAndObserveImageData(image)
    node.SetSpacing(2.0, 2.0, 2.0)
    return node


@pytest.fixture
def make_runner(headless, tmp_path, fake_engine, monkeypatch):
    def make(mode="ok"):
        monkeypatch.setenv("FAKE_ENGINE_MODE", mode)
        return runner_lib.Runner(lambda: list(fake_engine), tmp_path / "tmp", headless.scene)
    return make


def wait(run, timeout=60):
    deadline = time.monotonic() + timeout
    while run.process.is_running():
        run.process.poll()
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)
    return run.process.wait()


# ---------------------------------------------------------------- settings captured at Apply


def test_results_go_to_the_run_input_and_replace_option_not_the_selector_at_the_end(headless, make_runner):
    runner = make_runner()
    first = big_volume(headless.scene, "first")
    second = big_volume(headless.scene, "second")
    p = parameters(first, replaceResults=True)
    runner.load_results(run := runner.start_synthesis(runner_lib.capture_settings(p)), wait(run).manifest)
    runner.release(run)
    assert len(scene_lib.find_result_folders(headless.scene, first)) == 1
    # Second run on "first" with replace; during the run the user selects "second" and unticks replace.
    run = runner.start_synthesis(runner_lib.capture_settings(p))
    p.inputVolume, p.replaceResults, p.cohort = second, False, "AD"
    outcome = wait(run)
    runner.load_results(run, outcome.manifest)
    runner.release(run)
    assert run.settings.input_node is first and run.settings.replace_results and run.settings.cohort == "HC"
    assert len(scene_lib.find_result_folders(headless.scene, first)) == 1  # replaced, not added
    assert scene_lib.find_result_folders(headless.scene, second) == []


def test_a_second_run_is_refused_while_one_is_going(headless, make_runner):
    runner = make_runner("slow")
    p = parameters(big_volume(headless.scene, "T1"))
    run = runner.start_synthesis(runner_lib.capture_settings(p))
    assert runner.busy()
    with pytest.raises(runner_lib.RunAlreadyGoingError, match="still busy"):
        runner.start_synthesis(runner_lib.capture_settings(p))
    with pytest.raises(runner_lib.RunAlreadyGoingError):
        runner.start_preview(runner_lib.capture_settings(p), 5)
    with pytest.raises(runner_lib.RunAlreadyGoingError):
        runner.start_job(dependencies.CommandChain([[sys.executable, "-c", "pass"]]))
    run.process.cancel(grace_s=1.0)
    assert wait(run).status == "cancelled"
    runner.release(run)
    assert not runner.busy()
    # Refused choices do not leave the runner busy.
    with pytest.raises(ValueError):
        runner.start_synthesis(runner_lib.capture_settings(parameters(None)))
    assert not runner.busy()


def test_later_previews_reuse_the_alignment_of_an_earlier_run_of_the_same_volume(headless, make_runner):
    """The first preview of a volume aligns it; the engine's manifest records the affine, and the next
    previews of the same, unchanged volume pass that manifest (--alignment) so the engine skips the
    registration. Changed voxels, another volume or another template bank start afresh."""
    runner = make_runner()
    volume, other = big_volume(headless.scene, "T1"), big_volume(headless.scene, "other")

    def preview(node, **changes):
        run = runner.start_preview(runner_lib.capture_settings(parameters(node, **changes)), 5)
        outcome = wait(run)
        assert outcome.succeeded
        runner.remember_alignment(run, outcome.manifest)  # what preview_outputs does after reading the pictures
        runner.release(run)
        argv = run.process.argv
        return (argv[argv.index("--alignment") + 1] if "--alignment" in argv else None), outcome.manifest

    used, first_manifest = preview(volume)
    assert used is None
    used, _ = preview(volume)
    assert used == str(Path(first_manifest).resolve())
    assert preview(other)[0] is None
    volume.GetImageData().Modified()  # the voxels changed (e.g. an edit): the alignment is not trusted
    assert preview(volume)[0] is None
    # a synthesis with the default bank is reused; one with another template bank is not
    for name, bank in (("default", ""), ("custom", str(runner.temporary_dir))):
        node = big_volume(headless.scene, name)
        run = runner.start_synthesis(runner_lib.capture_settings(parameters(node, templateBank=bank)))
        runner.remember_alignment(run, wait(run).manifest)
        runner.release(run)
        assert (preview(node)[0] is not None) == (name == "default")


def test_pace_reaches_the_engine_only_when_it_is_not_the_median(tmp_path):
    base = dict(input_path="in.nii", age=70.0, cohort="HC", targets=(75.0,), output_dir=str(tmp_path / "o"))
    assert "--pace" not in engine.synthesize_argv(["e"], engine.SynthesisRequest(**base))
    argv = engine.synthesize_argv(["e"], engine.SynthesisRequest(pace=90, **base))
    assert argv[argv.index("--pace") + 1] == "90"
    settings = runner_lib.RunSettings(input_node=None, age=70.0, cohort="HC", target_ages_text="75", pace=100)
    assert any("Pace 100" in m for m in settings.problems())


def test_paths_are_passed_as_typed_and_empty_means_default(headless, tmp_path, make_runner):
    runner = make_runner()
    p = parameters(big_volume(headless.scene, "T1"), outputFolder=str(tmp_path / "mine"), templateBank=".")
    settings = runner_lib.capture_settings(p)
    assert settings.template_bank == ""
    run = runner.start_synthesis(settings)
    assert run.folder.parent == tmp_path / "mine"
    assert "--bank" not in run.process.argv
    assert wait(run).succeeded
    runner.release(run)


# ---------------------------------------------------------------- processes: Windows flags, process trees


def test_windows_runs_without_a_console_window_in_its_own_group():
    """As Slicer's slicer.util.launchConsoleProcess (STARTUPINFO, SW_HIDE) plus CREATE_NO_WINDOW."""
    kwargs = engine.popen_platform_kwargs("nt", startupinfo_factory=lambda: SimpleNamespace(dwFlags=0, wShowWindow=1))
    assert kwargs["creationflags"] & engine.CREATE_NO_WINDOW
    assert kwargs["creationflags"] & engine.CREATE_NEW_PROCESS_GROUP
    assert kwargs["startupinfo"].dwFlags & engine.STARTF_USESHOWWINDOW and kwargs["startupinfo"].wShowWindow == engine.SW_HIDE
    assert engine.popen_platform_kwargs("posix") == {"start_new_session": True}
    # taskkill: /F (a window-less console process ignores a polite close) and /T (the whole tree).
    assert engine.kill_tree_argv(1234) == ["taskkill", "/F", "/T", "/PID", "1234"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] not in "ZX"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(os.name != "posix" or not os.path.isdir("/proc"), reason="POSIX process groups")
def test_cancel_ends_the_whole_process_tree(tmp_path):
    """The engine's children (here one that ignores SIGTERM, like a stuck worker) end with it."""
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "engine_with_child.py"
    script.write_text(textwrap.dedent(f"""
        import json, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        print(json.dumps({{"event": "progress", "stage": "x", "fraction": 0.1}}), flush=True)
        time.sleep(300)
    """))
    process = engine.EngineProcess([sys.executable, str(script)]).start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(child)
    process.cancel(grace_s=1.0)
    assert process.wait(timeout=10).status == "cancelled"
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the engine's child outlived Cancel")


# ---------------------------------------------------------------- dependency installation in the background


def test_install_commands_never_touch_bundled_packages(tmp_path):
    plan = dependencies.make_install_plan(
        ["torch>=2.1", "numpy>=1.24", "SimpleITK>=2.2", "tqdm>=4.60", "matplotlib>=3.7"], torch_installed=True,
        engine_installed=False, version_of=lambda n: {"numpy": "1.26.1", "SimpleITK": "2.2.1"}.get(n))
    commands = dependencies.install_commands(plan, "/slicer/bin/PythonSlicer", tmp_path / "src", tmp_path / "c.txt")
    assert commands == [
        ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "--upgrade", "--no-deps", str(tmp_path / "src")],
        ["/slicer/bin/PythonSlicer", "-m", "pip", "install", "tqdm>=4.60", "matplotlib>=3.7", "-c", str(tmp_path / "c.txt")],
    ]
    assert (tmp_path / "c.txt").read_text().splitlines() == ["SimpleITK==2.2.1", "numpy==1.26.1"]
    summary = plan.summary()
    assert "without its dependencies" in summary and "kept as Slicer bundles them: numpy 1.26.1, SimpleITK 2.2.1" in summary
    # torch through PyTorchUtils' light-the-torch arguments, asked for the engine's minimum version.
    plan = dependencies.make_install_plan(["torch>=2.1"], torch_installed=False, engine_installed=True,
                                          version_of=lambda n: None)
    assert plan.torch_requirement == ">=2.1"
    # An installed torch older than the engine's minimum is upgraded through PyTorchUtils; a recent one is kept.
    old = dependencies.make_install_plan(["torch>=2.1"], torch_installed=True, engine_installed=True,
                                         version_of=lambda n: "2.0.1+cu118")
    assert old.torch_requirement == ">=2.1"
    recent = dependencies.make_install_plan(["torch>=2.1"], torch_installed=True, engine_installed=True,
                                            version_of=lambda n: "2.8.0+cpu")
    assert recent.torch_requirement is None and recent.nothing_to_do
    commands = dependencies.install_commands(plan, "py", tmp_path, tmp_path / "c.txt",
                                             torch_args=["install", "torch>=2.1", "torchvision"])
    assert commands[-1] == ["py", "-m", "light_the_torch", "install", "torch>=2.1", "torchvision"]


def test_command_chain_runs_in_order_streams_output_and_stops_at_a_failure(tmp_path):
    marker = tmp_path / "order.txt"
    step = "import sys; open({!r}, 'a').write(sys.argv[1]); print('did', sys.argv[1])".format(str(marker))
    chain = dependencies.CommandChain([[sys.executable, "-c", step, "1"], [sys.executable, "-c", step, "2"]]).start()
    events = []
    assert chain.wait(timeout=60, on_event=events.append).succeeded
    assert marker.read_text() == "12"
    assert [e["message"] for e in events if e.get("level") == "output"] == ["did 1", "did 2"]
    failing = dependencies.CommandChain([[sys.executable, "-c", "import sys; print('no network', file=sys.stderr); sys.exit(3)"],
                                         [sys.executable, "-c", step, "3"]]).start()
    outcome = failing.wait(timeout=60)
    assert outcome.status == "failed" and "no network" in outcome.message
    assert marker.read_text() == "12"  # the second command never ran


def test_command_chain_cancel(tmp_path):
    chain = dependencies.CommandChain([[sys.executable, "-c", "import time; time.sleep(300)"]]).start()
    time.sleep(0.3)
    started = time.monotonic()
    chain.cancel(grace_s=1.0)
    assert chain.outcome().status == "cancelled" and time.monotonic() - started < 5


def test_the_module_looks_the_engine_up_without_starting_a_process(tmp_path):
    """In Slicer, PythonSlicer runs Slicer's own environment: find_spec in-process, no probe on the GUI thread."""
    missing = str(tmp_path / "no" / "PythonSlicer")  # probing it would fail: nothing is started
    assert engine.find_engine(python_executable=missing, environ={}, probe=False) == [missing, "-m", "inbrainsyn"]
    with pytest.raises(engine.EngineMissingError):
        engine.find_engine(python_executable=missing, environ={}, probe=True)
