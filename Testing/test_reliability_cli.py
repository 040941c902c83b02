"""`inbrainsyn synthesize` never loses a result: concurrent runs, kills at several points, a full disk.

Runs use a 4 mm copy of the shipped bank and the demo subject at 3 mm (~20 s per run on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from small_bank import make_small_bank, small_demo_subject

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability")
    return make_small_bank(folder / "bank"), small_demo_subject(folder / "demo.nii.gz")


def argv(setup, out, cohort="HC", *extra):
    """A run on the coarse test bank. --force-input: these tests are about what happens to the output
    folder, and on a 4 mm bank the registration (tuned for the shipped 1.5 mm grid) inflates the
    labelled intracranial volume past the adult range (measured 3516 mL; 2180 mL for the 1 mm demo on
    the shipped bank), which the volume check would refuse before any output exists."""
    bank, image = setup
    return [sys.executable, "-m", "inbrainsyn", "synthesize", str(image), "--age", "70", "--targets", "75",
            "--cohort", cohort, "--bank", str(bank), "-o", str(out), "--force-input", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def hidden_leftovers(folder: Path, name: str) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}"))


def test_two_runs_into_one_folder_exactly_one_succeeds(tmp_path, setup):
    out = tmp_path / "out"
    runs = [subprocess.Popen(argv(setup, out, cohort, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env()) for cohort in ("HC", "AD")]
    results = [(p.wait(timeout=600), *p.communicate()) for p in runs]
    codes = [code for code, _, _ in results]
    assert sorted(codes) == [0, 7], results
    winner = ("HC", "AD")[codes.index(0)]
    loser_err = results[codes.index(7)][2]
    assert "another inbrainsyn run is writing this output folder right now" in loser_err
    assert str(out) in loser_err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["cohort"] == winner  # the folder holds the winner's results, complete
    assert all((out / o["path"]).exists() for o in manifest["outputs"])
    assert hidden_leftovers(tmp_path, "out") == []


def run_and_kill(setup, out, stop_when, sig):
    """Start a --json run and send ``sig`` at the first event for which ``stop_when(event)`` holds."""
    proc = subprocess.Popen(argv(setup, out, "HC", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if stop_when(event):
            proc.send_signal(sig)
            break
    else:
        pytest.fail(f"the run ended before the kill point: {seen[-3:]}")
    proc.communicate(timeout=300)
    return proc.returncode, seen


KILL_POINTS = [
    ("before registration", lambda e: e.get("stage") == "affine", signal.SIGKILL),
    ("while writing outputs", lambda e: "warping the input" in e.get("message", ""), signal.SIGKILL),
    ("during registration", lambda e: e.get("stage") == "registration", signal.SIGTERM),
    ("writing the report", lambda e: e.get("stage") == "report", signal.SIGTERM),
]


@pytest.mark.parametrize("name, stop_when, sig", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_a_killed_run_leaves_no_output_folder(tmp_path, setup, name, stop_when, sig):
    out = tmp_path / "out"
    code, _ = run_and_kill(setup, out, stop_when, sig)
    assert code != 0
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    if sig == signal.SIGTERM:
        assert hidden_leftovers(tmp_path, "out") == []  # SIGTERM unwinds: staging and lock removed
    else:
        # SIGKILL cannot be caught: a hidden staging folder and the lock file may stay; the lock itself
        # died with the process, and the next claim of the folder sweeps the staging away
        from inbrainsyn import io

        with io.claim_output_dir(out):
            assert [p for p in hidden_leftovers(tmp_path, "out") if "partial" in p] == []
        assert hidden_leftovers(tmp_path, "out") == []


def test_an_interrupted_overwrite_keeps_the_old_results(tmp_path, setup):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')
    proc = subprocess.Popen(argv(setup, out, "HC", "--json", "--overwrite"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    for line in proc.stdout:
        if "warping the input" in json.loads(line).get("message", ""):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


FULL_DISK = textwrap.dedent("""
    set -e
    mount -t tmpfs -o size={size}k tmpfs {mnt}
    mkdir {mnt}/old && echo '{{"old": true}}' > {mnt}/old/manifest.json
    set +e
    {cmd_new} > {mnt}.new.log 2>&1; echo "new=$?" >> {mnt}.codes
    {cmd_old} > {mnt}.old.log 2>&1; echo "old=$?" >> {mnt}.codes
    ls -A {mnt} > {mnt}.listing; cat {mnt}/old/manifest.json > {mnt}.oldmanifest
""")


def test_a_full_disk_fails_cleanly(tmp_path, setup):
    """Output onto a 1.2 MB tmpfs (outputs need ~2.5 MB): exit 5, a clear message, nothing published,
    earlier results intact. Needs a private mount namespace (``unshare -rm``) or root."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot make a small filesystem here (no `unshare -rm`: user namespaces disabled)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    new = " ".join(argv(setup, mnt / "new", "HC", "--quiet"))
    old = " ".join(argv(setup, mnt / "old", "HC", "--quiet", "--overwrite"))
    script = FULL_DISK.format(size=1200, mnt=mnt, cmd_new=new, cmd_old=old)
    proc = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, env=env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    codes = dict(line.split("=") for line in Path(f"{mnt}.codes").read_text().split())
    assert codes == {"new": "5", "old": "5"}, (codes, Path(f"{mnt}.new.log").read_text()[-2000:])
    for log in (f"{mnt}.new.log", f"{mnt}.old.log"):
        text = Path(log).read_text()
        # ENOSPC from Python/ITK, or a NIfTI that ITK cut short without an error (io._nifti_complete)
        assert "could not be written (" in text and "MiB free there" in text, text[-2000:]
        assert "No space left on device" in text
        assert "Traceback" not in text
    assert Path(f"{mnt}.listing").read_text().split() == ["old"]  # no new folder, no staging, no lock
    assert json.loads(Path(f"{mnt}.oldmanifest").read_text()) == {"old": True}
