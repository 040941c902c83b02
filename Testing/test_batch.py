"""``inbrainsyn batch`` and the subject engine (inbrainsyn.parallel) on a real 2-worker Dask LocalCluster.

Inputs are tiny (a 32^3, 2 mm ball-anatomy bank with the atrophy model, subjects made from its
template by small affine changes), so a synthesis takes seconds and the tests exercise the engine,
not the maths: identical results to ``inbrainsyn synthesize``, a bad row isolated, resume after an
interruption, a worker killed mid-task, the whole table checked first.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inbrainsyn.cli import main
from test_templates import make_bank

pytest.importorskip("distributed")

from inbrainsyn.batch import manifest_problem, run_batch  # noqa: E402
from inbrainsyn.errors import InputError  # noqa: E402
from inbrainsyn.parallel import ClusterOptions, LocalPlan, _local_cluster, map_subjects, plan_local, thread_limit  # noqa: E402
from inbrainsyn.synthesis import SynthesisRequest, run_synthesis  # noqa: E402

# The 32^3 ball bank is far below adult brain volumes: the input plausibility checks would refuse it.
COMMON = lambda bank: {"bank": str(bank), "force_input": True}  # noqa: E731
HEADER = ["subject", "input", "age", "cohort", "targets", "transition_age", "skull_stripped"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return make_bank(tmp_path_factory.mktemp("bank") / "tiny", model=True)


def _subject_image(bank: Path, path: Path, scale: float, shift: float) -> Path:
    """The bank's 60 y HC template under a small affine change (a different 'subject')."""
    template = sitk.ReadImage(str(bank / "HC_60.nii.gz"))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([scale, 0, 0, 0, 1.0 / scale, 0, 0, 0, 1.0])
    transform.SetTranslation((shift, -shift, 0.5 * shift))
    image = sitk.Resample(template, template, transform, sitk.sitkLinear, 0.0)
    sitk.WriteImage(sitk.Cast(image * 1000, sitk.sitkInt16), str(path))
    return path


@pytest.fixture(scope="module")
def subjects(bank, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    images = {f"s{i}": _subject_image(bank, folder / f"s{i}.nii.gz", 1.0 + 0.02 * (i - 1), 1.5 * i) for i in range(3)}
    constant = sitk.Image(24, 24, 24, sitk.sitkInt16) + 7  # readable header, no anatomy: fails when run
    constant.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(constant, str(folder / "constant.nii.gz"))
    images["bad"] = folder / "constant.nii.gz"
    return images


def write_table(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def row(name, image, age=62, cohort="HC", targets="66 70", transition="", skull="yes"):
    return [name, str(image), age, cohort, targets, transition, skull]


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster of 2 worker processes, 1 thread each (the engine's own constructor)."""
    from distributed import Client

    cluster = _local_cluster(LocalPlan(workers=2, threads_per_worker=1), dashboard=False)
    with Client(cluster) as c:
        c.wait_for_workers(2, timeout=120)
        yield c
    cluster.close()


def volumes(path: Path) -> list[tuple]:
    return [(r["age"], r["cohort"], r["region"], float(r["volume_ml"])) for r in csv.DictReader(open(path))]


def image_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------------------------


def test_batch_on_two_workers_matches_serial_synthesize(tmp_path, bank, subjects, client):
    table = write_table(tmp_path / "cohort.csv", [
        row("s0", subjects["s0"]),
        row("s1", subjects["s1"], cohort="AD", targets="68"),
        row("s2", subjects["s2"], age=64, targets="67;72", transition="68"),
    ])
    events = []
    result = run_batch(table, tmp_path / "out", common=COMMON(bank), client=client, on_event=events.append)
    assert result.counts == {"ok": 3, "failed": 0, "skipped": 0}
    workers = {e["worker"] for e in events if e["status"] == "ok"}
    assert workers <= set(client.scheduler_info()["workers"])  # ran on the cluster's worker processes

    manifest = json.loads((tmp_path / "out" / "batch_manifest.json").read_text())
    assert manifest["complete"] and [s["status"] for s in manifest["subjects"]] == ["ok"] * 3
    for entry in manifest["subjects"]:
        assert entry["worker"] in workers and entry["seconds"] > 0 and entry["timings_s"]["total"] > 0

    long_rows = list(csv.DictReader(open(tmp_path / "out" / "cohort_volumes.csv")))
    for name, request in (
        ("s0", dict(age=62, targets=[66, 70], cohort="HC")),
        ("s1", dict(age=62, targets=[68], cohort="AD")),
        ("s2", dict(age=64, targets=[67, 72], cohort="HC", transition_age=68)),
    ):
        # serially, in this process, with what a 1-thread worker uses: 1 torch/ITK thread, 1-thread affine
        serial = tmp_path / f"serial-{name}"
        with thread_limit(1):
            run_synthesis(SynthesisRequest(input_path=str(subjects[name]), skull_stripped=True, bank=str(bank),
                                           affine_threads=1, force_input=True, **request), serial)
        ours = tmp_path / "out" / name
        assert manifest_problem(ours) is None
        files = sorted(p.name for p in serial.iterdir())
        assert sorted(p.name for p in ours.iterdir()) == files
        assert (ours / "volumes.csv").read_text() == (serial / "volumes.csv").read_text()
        for image in (f for f in files if f.endswith(".nii.gz")):
            assert np.array_equal(image_array(serial / image), image_array(ours / image)), image  # bit-identical
        theirs, mine = (json.loads((d / "manifest.json").read_text()) for d in (serial, ours))
        assert mine["parameters"] == theirs["parameters"] and mine["outputs"] == theirs["outputs"]
        assert [(r["age"], r["cohort"], r["region"], r["volume_ml"]) for r in long_rows if r["subject"] == name] == \
            [(r["age"], r["cohort"], r["region"], r["volume_ml"]) for r in csv.DictReader(open(ours / "volumes.csv"))]
    assert (tmp_path / "out" / "cohort_report.png").stat().st_size > 10_000


def test_every_table_problem_is_listed_before_any_work(tmp_path, bank, subjects):
    table = write_table(tmp_path / "cohort.csv", [
        row("s0", subjects["s0"]),
        row("s0", subjects["s1"]),  # duplicate id
        row("gone", tmp_path / "missing.nii.gz"),  # unreadable path
        row("old", subjects["s1"], age=95, targets="99"),  # outside the bank (60-80)
        row("back", subjects["s2"], age=70, targets="66"),  # target not above the age
        row("x/y", subjects["s2"]),  # not a folder name
        row("mild", subjects["s2"], cohort="MCI"),
    ])
    with pytest.raises(InputError) as caught:
        run_batch(table, tmp_path / "out", common=COMMON(bank))
    message = str(caught.value)
    for expected in ("line 3: subject 's0' is already on line 2", "missing.nii.gz: no such file",
                     "line 5 (old): age 95 is outside", "line 6 (back): target age 66 must be above",
                     "line 7: subject id 'x/y' cannot name a folder", "line 8: cohort 'MCI' must be HC or AD"):
        assert expected in message
    assert "6 problem(s), nothing was run" in message
    assert not (tmp_path / "out").exists()

    (tmp_path / "short.csv").write_text("subject,input,age\ns0,a.nii.gz,70\n")
    with pytest.raises(InputError, match="missing column.*cohort, targets"):
        run_batch(tmp_path / "short.csv", tmp_path / "out2", common=COMMON(bank))


def test_a_failing_subject_is_isolated_and_the_exit_code_says_so(tmp_path, bank, subjects, capsys):
    """The real command line on its own local cluster (2 workers): JSON events, exit code, manifest."""
    table = write_table(tmp_path / "cohort.csv", [row("s0", subjects["s0"]), row("bad", subjects["bad"]),
                                                  row("s1", subjects["s1"], targets="70")])
    code = main(["batch", str(table), "-o", str(tmp_path / "out"), "--workers", "2", "--threads-per-worker", "1",
                 "--bank", str(bank), "--force-input", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 8
    ends = {e["subject"]: e for e in lines if e["event"] == "subject" and e["status"] in ("ok", "failed")}
    assert {k: e["status"] for k, e in ends.items()} == {"s0": "ok", "bad": "failed", "s1": "ok"}
    assert "empty or constant" in ends["bad"]["error"]
    assert {e["subject"] for e in lines if e["event"] == "subject" and e["status"] == "started"} == {"s0", "bad", "s1"}
    assert lines[-1]["event"] == "error" and lines[-1]["exit_code"] == 8 and "bad" in lines[-1]["message"]
    assert lines[-2]["event"] == "result"
    manifest = json.loads(Path(lines[-2]["manifest"]).read_text())
    assert manifest["cluster"]["kind"] == "local" and manifest["cluster"]["workers"] == 2
    bad = next(s for s in manifest["subjects"] if s["subject"] == "bad")
    assert bad["status"] == "failed" and bad["exit_code"] == 2 and bad["attempts"] == 1  # input errors are not retried
    assert not (tmp_path / "out" / "bad").exists()
    assert not list((tmp_path / "out").glob(".bad.partial-*"))
    for name in ("s0", "s1"):
        assert manifest_problem(tmp_path / "out" / name) is None
    assert {r["subject"] for r in csv.DictReader(open(tmp_path / "out" / "cohort_volumes.csv"))} == {"s0", "s1"}


def test_resume_after_an_interrupted_run(tmp_path, bank, subjects):
    table = write_table(tmp_path / "cohort.csv", [row("s0", subjects["s0"]), row("s1", subjects["s1"]),
                                                  row("s2", subjects["s2"])])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "inbrainsyn", "batch", str(table), "-o", str(out), "--workers", "1",
               "--threads-per-worker", "1", "--bank", str(bank), "--force-input", "--json"]
    # SIGINT handled as Ctrl-C even when this test runs in a background job (which inherits it ignored)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:  # interrupt (Ctrl-C) as soon as the first subject is finished
        event = json.loads(line)
        if event["event"] == "subject" and event["status"] == "ok":
            first = event["subject"]
            process.send_signal(signal.SIGINT)
            break
    assert process.wait(timeout=120) != 0
    finished = [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert first in finished and len(finished) < 3
    assert not json.loads((out / "batch_manifest.json").read_text())["complete"]
    before = (out / first / "manifest.json").stat().st_mtime_ns

    assert main(["batch", str(table), "-o", str(out), "--bank", str(bank), "--force-input", "--quiet"]) == 2  # refused without --resume

    events = []
    result = run_batch(table, out, common=COMMON(bank), resume=True, on_event=events.append)
    statuses = {s["subject"]: s["status"] for s in result.subjects}
    assert all(statuses[s] == "skipped" for s in finished) and all(statuses[s] == "ok" for s in statuses if s not in finished)
    assert (out / first / "manifest.json").stat().st_mtime_ns == before  # finished results untouched
    for name in ("s0", "s1", "s2"):
        assert manifest_problem(out / name) is None
    assert not list(out.glob(".*.partial-*"))

    # a damaged result is not "complete": resume redoes it (and only it)
    (out / "s1" / "report.png").unlink()
    result = run_batch(table, out, common=COMMON(bank), resume=True)
    assert {s["subject"]: s["status"] for s in result.subjects} == {"s0": "skipped", "s1": "ok", "s2": "skipped"}
    assert manifest_problem(out / "s1") is None


def test_a_worker_killed_mid_task_is_retried_once(tmp_path, bank, subjects, client):
    table = write_table(tmp_path / "cohort.csv", [row("s0", subjects["s0"]), row("s1", subjects["s1"])])
    killed = {}

    def kill_first_start(event):
        if event["status"] == "started" and event["subject"] == "s0" and not killed:
            time.sleep(0.2)  # inside the synthesis, which takes seconds even here
            killed["pid"] = event["pid"]
            os.kill(event["pid"], signal.SIGKILL)

    result = run_batch(table, tmp_path / "out", common=COMMON(bank), client=client, on_event=kill_first_start)
    entry = {s["subject"]: s for s in result.subjects}
    assert killed and entry["s0"]["status"] == "ok" and entry["s1"]["status"] == "ok"
    assert entry["s0"]["attempts"] == 2 and entry["s0"]["pid"] != killed["pid"]
    assert manifest_problem(tmp_path / "out" / "s0") is None
    assert not list((tmp_path / "out").glob(".s0.partial-*"))  # the killed attempt's staging folder is gone
    attempts = (tmp_path / "out" / ".inbrainsyn-batch" / "s0.attempts").read_text().splitlines()
    assert len(attempts) == 2


def test_in_process_engine_records_failures_and_values():
    import math

    events = []
    outcomes = map_subjects(math.sqrt, {"a": 9.0, "b": -1.0}, on_event=events.append)
    assert outcomes["a"].status == "ok" and outcomes["a"].value == 3.0
    assert outcomes["b"].status == "failed" and "math domain error" in outcomes["b"].error
    assert [e["status"] for e in events] == ["started", "ok", "started", "failed"]


def test_local_plan_follows_cores_memory_and_gpus():
    gib = 2**30
    assert (plan_local(cores=2, memory_bytes=16 * gib).workers, plan_local(cores=2, memory_bytes=16 * gib).threads_per_worker) == (2, 1)
    tight = plan_local(cores=8, memory_bytes=5 * gib)  # memory for 2 workers: 2 x 4 threads
    assert (tight.workers, tight.threads_per_worker) == (2, 4)
    gpus = plan_local(cores=16, memory_bytes=64 * gib, devices=["0", "1"])
    assert (gpus.workers, gpus.threads_per_worker, gpus.devices) == (2, 8, ["0", "1"])
    assert plan_local(workers=3, cores=2, memory_bytes=64 * gib).threads_per_worker == 1
    with pytest.raises(InputError, match="do not combine"):
        ClusterOptions(scheduler="tcp://x:1", workers=2).validate()


def test_per_gpu_workers_each_see_one_device():
    """One worker per GPU, each started with its own CUDA_VISIBLE_DEVICES (checked on CPU: the env is the mechanism)."""
    from distributed import Client

    cluster = _local_cluster(LocalPlan(workers=2, threads_per_worker=1, devices=["0", "1"]), dashboard=False)
    try:
        with Client(cluster) as c:
            c.wait_for_workers(2, timeout=120)
            seen = c.run(os.getenv, "CUDA_VISIBLE_DEVICES")
        assert sorted(seen.values()) == ["0", "1"]
    finally:
        cluster.close()


def test_phantom_on_the_cluster_writes_the_same_files_as_in_process(tmp_path, client):
    from inbrainsyn.phantom import PhantomConfig, make_phantom
    from inbrainsyn.templates import load_bank

    config = PhantomConfig(subjects=2, seed=5, spacing=4.0, followup_years=(3.0,))
    serial = make_phantom(tmp_path / "serial", config, bank=load_bank(None), log=lambda *_: None)
    ours = make_phantom(tmp_path / "dask", config, bank=load_bank(None), log=lambda *_: None, cluster=client)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) and len(files) > 10
    for name in files:
        if name.name != "phantom.json":
            assert (serial / name).read_bytes() == (ours / name).read_bytes(), name
    a, b = (json.loads((d / "phantom.json").read_text()) for d in (serial, ours))
    for record in (a, b, *a["subjects"], *b["subjects"]):  # wall times differ
        record.pop("seconds")
    assert a == b


def test_batch_on_an_existing_scheduler_whose_workers_have_no_subject_resource(tmp_path, bank, subjects, capsys):
    """--scheduler: a plain cluster (1 worker, 2 threads, no `subject` resource) runs one subject per thread."""
    from distributed import LocalCluster

    table = write_table(tmp_path / "cohort.csv", [row("s0", subjects["s0"]), row("s1", subjects["s1"], targets="68")])
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        code = main(["batch", str(table), "-o", str(tmp_path / "out"), "--scheduler", cluster.scheduler_address,
                     "--bank", str(bank), "--force-input", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "batch_manifest.json").read_text())
    assert manifest["cluster"] == {"kind": "existing", "scheduler": cluster.scheduler_address}
    assert [s["status"] for s in manifest["subjects"]] == ["ok", "ok"]
    assert len({s["pid"] for s in manifest["subjects"]}) == 1  # the one worker process ran both
