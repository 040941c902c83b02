"""Options every command shares (parsed in cli/common.py) and progress output for logs (issue 15)."""

from __future__ import annotations

import io as pyio
import json
import subprocess
import sys

import pytest

from inbrainsyn.cli import build_parser, common, main
from inbrainsyn.progress import JsonLinesReporter, LineReporter, Reporter, TqdmReporter, reporter_for


def leaf_commands():
    parser = build_parser()
    return {leaf.prog.split(" ", 1)[1]: leaf for leaf in common.leaf_parsers(parser) if leaf is not parser}


def test_every_command_has_the_common_options():
    leaves = leaf_commands()
    # the commands a user can run; a new one is covered automatically
    assert {"register", "synthesize", "transport", "demo", "evaluate", "phantom", "daninet preview",
            "daninet train", "daninet evaluate", "bank info"} <= set(leaves)
    for name, parser in leaves.items():
        options = {o for action in parser._actions for o in action.option_strings}
        missing = [o for o in common.COMMON_OPTIONS if o not in options]
        assert not missing, f"{name} lacks {missing}"
        defaults = [parser.get_default(d) for d in ("device", "threads", "json", "quiet", "overwrite")]
        assert defaults == ["auto", None, False, False, False], name


def test_daninet_preview_takes_a_device():
    args = build_parser().parse_args(["daninet", "preview", "x.nii.gz", "--age", "70", "--cohort", "HC",
                                      "--targets", "75", "--slice", "40", "-o", "out", "--device", "cpu"])
    assert args.device == "cpu"


def test_threads_are_applied_and_checked(capsys):
    import SimpleITK as sitk
    import torch

    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        common.apply(build_parser().parse_args(["bank", "info", "--threads", "1"]))
        assert torch.get_num_threads() == 1 and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    finally:
        torch.set_num_threads(before[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[1])
    assert main(["bank", "info", "--threads", "0", "--json"]) == 2
    out, err = capsys.readouterr()
    event = json.loads(out.strip().splitlines()[-1])
    assert event["event"] == "error" and "--threads" in event["message"] and "--threads" in err


class _Stream(pyio.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_reporter_choice_follows_the_flags_and_the_stream():
    assert isinstance(reporter_for(as_json=True), JsonLinesReporter)
    assert type(reporter_for(quiet=True)) is Reporter
    assert isinstance(reporter_for(stream=_Stream(tty=False)), LineReporter)
    assert isinstance(reporter_for(stream=_Stream(tty=True)), TqdmReporter)


def test_progress_to_a_file_is_one_line_per_stage():
    stream = _Stream(tty=False)
    reporter = reporter_for(stream=stream)
    for stage, steps in (("read", 1), ("registration", 500), ("outputs", 30)):
        for i in range(steps):
            reporter.progress(stage, i / steps, f"{stage} {100 * i // steps}%")
    reporter.log("a warning", "warning")
    timings = reporter.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5, lines  # three stages, the log line, the summary
    assert [line.split("] ", 1)[1].split(":")[0] for line in lines[:3]] == ["read", "registration", "outputs"]
    assert "[warning] a warning" in lines[3] and "registration" in lines[4]
    assert set(timings) == {"read", "registration", "outputs"}


def test_a_command_writing_to_a_pipe_prints_stage_lines_not_bar_redraws(tmp_path):
    """`inbrainsyn register` with stderr to a pipe: a few stage lines, no carriage-return redraws."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij")
    fixed = np.exp(-4 * (x**2 + y**2 + z**2)) + 0.01 * rng.normal(size=x.shape)
    moving = np.exp(-4 * ((x - 0.1) ** 2 + y**2 + z**2)) + 0.01 * rng.normal(size=x.shape)
    for name, array in (("f", fixed), ("m", moving)):
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(tmp_path / f"{name}.nii.gz"))
    run = subprocess.run([sys.executable, "-m", "inbrainsyn", "register", str(tmp_path / "f.nii.gz"),
                          str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "out"), "--similarity", "mse",
                          "--levels", "2,1", "--iterations", "10,5", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    stage_lines = [line for line in run.stderr.splitlines() if line.startswith("[")]
    assert 2 <= len(stage_lines) <= 6, run.stderr
    assert any("registration" in line for line in stage_lines)


def test_parser_choices_agree_with_the_engine_and_building_it_imports_no_engine():
    from inbrainsyn.cli import evaluate_cmd, transport_cmd
    from inbrainsyn.evaluate import METHODS as EVALUATE_METHODS
    from inbrainsyn.synthesis import TRANSPORT_METHODS
    from inbrainsyn.transport import METHODS as TRANSPORT

    assert set(transport_cmd.METHODS) == set(TRANSPORT) == set(TRANSPORT_METHODS)
    assert tuple(evaluate_cmd.METHODS) == tuple(EVALUATE_METHODS)
    code = ("import sys; from inbrainsyn.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'SimpleITK', 'numpy', 'scipy', 'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"building the parser imported {loaded}"
