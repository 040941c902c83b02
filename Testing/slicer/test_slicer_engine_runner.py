"""The engine runner (background process, JSON events, cancel) and the GUI's value checks; no MRML."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from InBrainSynSlicerLib import engine
from InBrainSynSlicerLib.manifest import ManifestError, read_manifest


def request(tmp_path, **changes):
    values = dict(input_path=str(tmp_path / "in.nii.gz"), age=70.0, cohort="HC", targets=(75.0, 80.0),
                  output_dir=str(tmp_path / "out"))
    values.update(changes)
    return engine.SynthesisRequest(**values)


def env_with(mode):
    env = dict(os.environ)
    env["FAKE_ENGINE_MODE"] = mode
    return env


# ---------------------------------------------------------------- values typed in the GUI


def test_target_ages_parse_sorted_unique_and_reject_words():
    assert engine.parse_target_ages("85, 75;80 75") == [75.0, 80.0, 85.0]
    assert engine.parse_target_ages("  ") == []
    with pytest.raises(ValueError, match="'eighty'"):
        engine.parse_target_ages("75, eighty")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (dict(age=30.0, cohort="HC", targets=[75.0]), "outside the range"),
        (dict(age=70.0, cohort="HC", targets=[]), "at least one target"),
        (dict(age=70.0, cohort="HC", targets=[65.0]), "not after the patient's age"),
        (dict(age=70.0, cohort="HC", targets=[120.0]), "outside 40-100"),
        (dict(age=70.0, cohort="XX", targets=[75.0]), "unknown"),
        (dict(age=70.0, cohort="AD", targets=[75.0], conversion_enabled=True, conversion_age=72.0), "healthy (HC) baseline"),
        (dict(age=70.0, cohort="HC", targets=[75.0], conversion_enabled=True, conversion_age=78.0), "not after the last target"),
        (dict(age=70.0, cohort="HC", targets=[75.0], conversion_enabled=True, conversion_age=70.0), "after the patient's age"),
    ],
)
def test_age_problems_are_explained(args, fragment):
    problems = engine.check_ages(**args)
    assert problems and any(fragment in p for p in problems), problems


def test_valid_ages_have_no_problem():
    assert engine.check_ages(70.0, "HC", [75.0, 80.0], True, 78.0) == []
    assert engine.check_ages(70.0, "AD", [71.0]) == []


def test_synthesize_command_line_carries_every_choice(tmp_path):
    argv = engine.synthesize_argv(["inbrainsyn"], request(tmp_path, transition_age=77.5, method="schild",
                                                          device="cpu", bank="/banks/b", skull_stripped=True))
    assert argv[:3] == ["inbrainsyn", "synthesize", str(tmp_path / "in.nii.gz")]
    joined = " ".join(argv)
    for fragment in ("--age 70", "--cohort HC", "--targets 75 80", f"-o {tmp_path / 'out'}", "--transport schild",
                     "--device cpu", "--json", "--transition-age 77.5", "--bank /banks/b", "--skull-stripped"):
        assert fragment in joined
    plain = engine.synthesize_argv(["inbrainsyn"], request(tmp_path))
    assert "--transition-age" not in plain and "--bank" not in plain and "--skull-stripped" not in plain


def test_preview_command_line():
    argv = engine.preview_argv(["x"], "/in.nii.gz", 70, "AD", [75, 80], 64, "/out")
    assert argv == ["x", "daninet", "preview", "/in.nii.gz", "--age", "70", "--cohort", "AD", "--targets", "75", "80",
                    "--native-slice", "64", "-o", "/out", "--json"]


@pytest.fixture(scope="module")
def template_on_model_grid(tmp_path_factory):
    """The shipped bank's HC template at 75 y (on the DaniNet model's grid: no alignment, seconds)."""
    import SimpleITK as sitk

    from inbrainsyn.templates import load_bank

    path = tmp_path_factory.mktemp("tpl") / "template.nii.gz"
    sitk.WriteImage(load_bank(None).template("HC", 75.0), str(path))
    return path


def test_real_engine_preview_agrees_with_the_module(template_on_model_grid, tmp_path):
    """The module's command line runs on the installed engine and yields what the module shows."""
    from inbrainsyn.daninet.preview import load_model

    from InBrainSynSlicerLib.manifest import read_preview_outputs

    lo, hi = load_model().cfg.slice_band
    k = (lo + hi) // 2
    out = tmp_path / "prev"
    argv = engine.preview_argv([sys.executable, "-m", "inbrainsyn"], str(template_on_model_grid), 70, "HC", [75, 80],
                               k, str(out))
    events = []
    outcome = engine.run_engine(argv, on_event=events.append)
    assert outcome.succeeded, outcome.message
    assert outcome.manifest == str(out / "manifest.json")  # announced by the result event
    assert any(e["event"] == "progress" for e in events)
    images = read_preview_outputs(outcome.manifest)
    assert images["strip"] == out / "strip.png"
    assert sorted(images["slices"]) == [70.0, 75.0, 80.0]  # baseline and the two targets
    assert json.loads((out / "manifest.json").read_text())["inputs"]["native_slice"] == k
    # a slice below the trained band: a clear message naming the input's usable slices
    refused = engine.run_engine(engine.preview_argv([sys.executable, "-m", "inbrainsyn"], str(template_on_model_grid),
                                                    70, "HC", [75], lo - 5, str(tmp_path / "refused")))
    assert refused.status == "failed"
    assert f"native slices {lo} .. {hi}" in refused.message, refused.message
    assert "enough brain" in refused.message  # says why, not only where


def test_event_lines_json_plain_and_blank():
    assert engine.parse_event_line('{"event": "progress", "fraction": 0.5}\n') == {"event": "progress", "fraction": 0.5}
    assert engine.parse_event_line("hello\n") == {"event": "log", "level": "output", "message": "hello"}
    assert engine.parse_event_line('{"not": "an event"}')["event"] == "log"
    assert engine.parse_event_line("   \n") is None


# ---------------------------------------------------------------- the background process


def test_successful_run_streams_progress_and_announces_manifest(tmp_path, fake_engine):
    events = []
    outcome = engine.run_engine(engine.synthesize_argv(fake_engine, request(tmp_path, transition_age=80.0)),
                                on_event=events.append)
    assert outcome.succeeded, outcome.message
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    manifest = read_manifest(outcome.manifest)
    assert manifest.target_ages() == [75.0, 80.0]
    assert [i.cohort for i in manifest.images_of_kind("synthetic")] == ["HC", "AD"]


def test_plain_text_output_becomes_log_events(tmp_path, fake_engine):
    events = []
    outcome = engine.run_engine(engine.synthesize_argv(fake_engine, request(tmp_path)), on_event=events.append,
                                env=env_with("noisy"))
    assert outcome.succeeded
    assert {"event": "log", "level": "output", "message": "some library chatter"} in events


def test_engine_error_event_gives_its_message_and_code(tmp_path, fake_engine):
    outcome = engine.run_engine(engine.synthesize_argv(fake_engine, request(tmp_path)), env=env_with("fail"))
    assert outcome.status == "failed" and outcome.exit_code == 4
    assert "no brain found" in outcome.message


def test_engine_crash_without_event_reports_stderr(tmp_path, fake_engine):
    outcome = engine.run_engine(engine.synthesize_argv(fake_engine, request(tmp_path)), env=env_with("crash"))
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "out of memory" in outcome.message


def test_cancel_stops_the_process_quickly_and_writes_no_result(tmp_path, fake_engine):
    process = engine.EngineProcess(engine.synthesize_argv(fake_engine, request(tmp_path)), env=env_with("slow")).start()
    deadline = time.monotonic() + 20
    while not any(e["event"] == "progress" for e in process.poll()):
        assert time.monotonic() < deadline, "the fake engine never reported progress"
        time.sleep(0.05)
    assert process.outcome() is None  # still running
    started = time.monotonic()
    process.cancel()
    outcome = process.wait(timeout=10)
    assert time.monotonic() - started < 5
    assert outcome.status == "cancelled" and not process.is_running()
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_executable_is_engine_missing(tmp_path):
    with pytest.raises(engine.EngineMissingError, match="cannot start"):
        engine.EngineProcess([str(tmp_path / "no-such-engine"), "synthesize"]).start()


def test_find_engine_prefers_environment_then_python(tmp_path):
    assert engine.find_engine(environ={"INBRAINSYN_ENGINE": "/opt/x/bin/inbrainsyn --flag"}) == ["/opt/x/bin/inbrainsyn", "--flag"]
    assert engine.find_engine(python_executable=sys.executable, environ={}) == [sys.executable, "-m", "inbrainsyn"]
    # A Python without the engine: a clean, actionable message, not a traceback.
    bare = tmp_path / "bare_python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S -c \"import sys; sys.exit(1)\"\n")
    bare.chmod(0o755)
    with pytest.raises(engine.EngineMissingError, match="Install dependencies"):
        engine.find_engine(python_executable=str(bare), environ={})


def test_unknown_subcommand_is_explained_as_an_old_engine():
    message = engine.explain_failure(2, "", ["usage: inbrainsyn", "inbrainsyn: error: argument COMMAND: invalid choice: 'daninet'"])
    assert "does not accept the module's command" in message


def test_preview_against_an_engine_without_daninet_fails_cleanly(tmp_path):
    """The installed engine may predate ``daninet preview``: the button must get a clear failure."""
    argv = engine.preview_argv([sys.executable, "-m", "inbrainsyn"], str(tmp_path / "in.nii.gz"), 70, "HC", [75], 60,
                               str(tmp_path / "prev"))
    outcome = engine.run_engine(argv)
    # The input does not exist, so this fails either way: as an engine that does not know the
    # command line, or, once it does, with the engine's own message naming the input.
    assert outcome.status == "failed"
    assert "does not accept the module's command" in outcome.message or "in.nii.gz" in outcome.message, outcome.message


def test_a_command_without_events_succeeds_by_its_manifest(tmp_path):
    """A command that prints no JSON (an older ``daninet preview``): a clean exit that leaves the manifest is success."""
    manifest = tmp_path / "out" / "manifest.json"
    script = f"import pathlib; p = pathlib.Path({str(manifest)!r}); p.parent.mkdir(); p.write_text('{{}}'); print('done')"
    process = engine.EngineProcess([sys.executable, "-c", script], expected_manifest=str(manifest)).start()
    outcome = process.wait(timeout=30)
    assert outcome.succeeded and outcome.manifest == str(manifest)
    silent = engine.EngineProcess([sys.executable, "-c", "pass"], expected_manifest=str(tmp_path / "none.json")).start()
    assert silent.wait(timeout=30).status == "failed"


def test_output_folder_is_new_each_time(tmp_path):
    first = engine.output_folder_for(tmp_path, "T1 brain/x")
    second = engine.output_folder_for(tmp_path, "T1 brain/x")
    assert first != second and first.is_dir() and second.is_dir()
    assert "/" not in first.name and " " not in first.name


def test_output_folders_of_simultaneous_applies_differ(tmp_path):
    """Two Slicer windows pressing Apply in the same second: each gets its own new folder."""
    import threading

    folders, barrier = [], threading.Barrier(8)

    def apply():
        barrier.wait()
        folders.append(engine.output_folder_for(tmp_path, "T1"))

    threads = [threading.Thread(target=apply) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)


# ---------------------------------------------------------------- manifest problems


def test_manifest_missing_image_is_reported(engine_output_dir):
    (engine_output_dir.parent / "synthetic_age080.0.nii.gz").unlink()
    with pytest.raises(ManifestError, match="synthetic_age080.0.nii.gz is missing"):
        read_manifest(engine_output_dir)


def test_manifest_absent_and_garbled(tmp_path):
    with pytest.raises(ManifestError, match="did not finish"):
        read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "manifest.json")


def test_volumes_csv_with_a_missing_region_is_refused(engine_output_dir):
    csv_path = engine_output_dir.parent / "volumes.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1]) + "\n")  # last age loses whole_brain
    with pytest.raises(ManifestError, match="lacks regions"):
        read_manifest(engine_output_dir)


def test_manifest_reads_volumes_per_age(engine_output_dir):
    manifest = read_manifest(engine_output_dir)
    assert manifest.volumes.ages == [70.0, 75.0, 80.0, 85.0]
    assert manifest.volumes.cohorts == ["HC", "HC", "AD", "AD"]
    ventricles = manifest.volumes.volumes_ml["ventricles"]
    assert ventricles == sorted(ventricles) and ventricles[-1] > ventricles[0]  # the phantom's ventricle grows
    data = json.loads(engine_output_dir.read_text())
    assert manifest.baseline_age == data["inputs"]["age"]


def test_preview_outputs_strip_and_slices(tmp_path):
    from InBrainSynSlicerLib.manifest import read_preview_outputs

    for name in ("strip.png", "slice_75.png", "slice_80.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    outputs = [{"kind": "preview_strip", "path": "strip.png"},
               {"kind": "preview_slice", "age": 75, "path": "slice_75.png"},
               {"kind": "preview_slice", "age": 80, "path": "slice_80.png"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"outputs": outputs}))
    images = read_preview_outputs(tmp_path / "manifest.json")
    assert images["strip"] == tmp_path / "strip.png"
    assert images["slices"] == {75.0: tmp_path / "slice_75.png", 80.0: tmp_path / "slice_80.png"}
    (tmp_path / "manifest.json").write_text(json.dumps({"outputs": []}))
    with pytest.raises(ManifestError, match="no image"):
        read_preview_outputs(tmp_path / "manifest.json")
