"""Outputs that cannot be lost: exclusive claim of an output folder, atomic publish, clean failures."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from inbrainsyn import io
from inbrainsyn.errors import OutputBusyError, OutputError, OutputExistsError


def leftovers(folder: Path, name: str = "out") -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}"))


def test_second_claim_fails_at_once_and_first_publishes(tmp_path):
    out = tmp_path / "out"
    with io.claim_output_dir(out) as claim:
        start = time.perf_counter()
        with pytest.raises(OutputBusyError, match="another inbrainsyn run is writing"):
            io.claim_output_dir(out)
        assert time.perf_counter() - start < 1.0
        with claim.staging() as stage:
            (stage / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    assert leftovers(tmp_path) == []  # lock file and staging gone
    with pytest.raises(OutputExistsError, match="--overwrite"):
        io.claim_output_dir(out)


def test_claims_from_threads_are_exclusive(tmp_path):
    """Dask-like workers in one process: exactly one of many threads gets the folder."""
    out = tmp_path / "out"
    outcomes, barrier = [], threading.Barrier(6)

    def worker(i):
        barrier.wait()
        try:
            with io.staged_output_dir(out) as stage:
                (stage / "who.txt").write_text(str(i))
                time.sleep(0.3)
            outcomes.append(("ok", i))
        except (OutputBusyError, OutputExistsError) as exc:
            outcomes.append((type(exc).__name__, i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for kind, i in outcomes if kind == "ok"]
    assert len(winners) == 1
    assert (out / "who.txt").read_text() == str(winners[0])
    assert leftovers(tmp_path) == []


HOLD = """
import sys, time
from inbrainsyn import io
claim = io.claim_output_dir(sys.argv[1])
print("claimed", flush=True)
time.sleep(60)
"""


def test_claim_of_a_killed_process_is_released_by_the_os(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        with pytest.raises(OutputBusyError):
            io.claim_output_dir(out)
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL: the lock file stays (hidden, empty) but the lock went with the process
    with io.claim_output_dir(out) as claim, claim.staging() as stage:
        (stage / "x").write_text("x")
    assert (out / "x").exists() and leftovers(tmp_path) == []


def test_stale_staging_of_a_killed_run_is_swept_by_the_next_claim(tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "half.nii.gz").write_bytes(b"\0" * 10)
    other = tmp_path / ".other.partial-abc123"  # another output's staging is not touched
    other.mkdir()
    with io.claim_output_dir(tmp_path / "out"):
        assert not stale.exists() and other.exists()


def test_overwrite_replaces_only_after_completion(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with io.staged_output_dir(out, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")
            assert (out / "old.txt").exists()  # old results intact while the new ones are written
            raise RuntimeError("crash")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    with io.staged_output_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_publish_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this run was working"):
        with io.staged_output_dir(out) as stage:
            (stage / "mine.txt").write_text("mine")
            out.mkdir()  # someone else (not an inbrainsyn run) made it: even empty, it is not replaced
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


def test_publish_does_not_replace_even_an_empty_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with io.staged_output_dir(out) as stage:
            (stage / "mine.txt").write_text("mine")
            out.mkdir()
    assert list(out.iterdir()) == []


def test_completed_output_is_recognised(tmp_path):
    out = tmp_path / "out"
    assert not io.is_complete_output(out)
    with io.staged_output_dir(out) as stage:
        (stage / "manifest.json").write_text("{}")
    assert io.is_complete_output(out)


def test_write_errors_become_a_clear_output_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="could not be written .*MiB free"):
        with io.staged_output_dir(out) as stage:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage / "big.nii.gz"))
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_cut_nifti_is_detected(tmp_path):
    """ITK's NIfTI writer leaves a truncated file on a full disk without an error: write_image checks."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 30, 40)).astype(np.float32))
    for name in ("a.nii.gz", "b.nii"):
        path = io.write_image(image, tmp_path / name)
        assert io._nifti_complete(path, image)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # what a full disk leaves
        assert not io._nifti_complete(path, image)
    labels = sitk.Cast(sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)), sitk.sitkInt16)
    assert io._nifti_complete(io.write_image(labels, tmp_path / "l.nii.gz"), labels)
