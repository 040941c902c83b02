"""``inbrainsyn batch``: every row of a cohort table through exactly the synthesize pipeline, on Dask.

Each subject runs :func:`inbrainsyn.synthesis.run_synthesis` into ``DIR/<subject>/`` (the same files
as ``inbrainsyn synthesize``, claimed exclusively and published atomically by ``io.OutputClaim``).
The whole table is checked before any work; a failing subject is recorded while the others go on;
``resume`` skips subjects whose results are complete.  A batch task also holds
``DIR/.inbrainsyn-batch/<subject>.lock`` (an OS lock released even when a worker is killed) from its
completeness check to the end of the run, so a retried task finds a result its earlier attempt
completed instead of redoing or replacing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from inbrainsyn import io
from inbrainsyn.batch.table import CohortRow, check_readable, read_table
from inbrainsyn.errors import InBrainSynError, InputError, OutputBusyError
from inbrainsyn.parallel import ClusterOptions, Outcome, connect, map_subjects
from inbrainsyn.synthesis import SynthesisRequest

STATE_DIR = ".inbrainsyn-batch"  # locks, completion marks and attempt logs, inside DIR


class SubjectsFailedError(InBrainSynError):
    """The batch ran, but some subjects failed (listed in batch_manifest.json)."""

    exit_code = 8


@dataclass
class SubjectJob:
    """Everything one worker needs for one subject (picklable)."""

    subject: str
    request: SynthesisRequest
    outdir: str
    overwrite: bool
    run_id: str


@dataclass
class BatchResult:
    manifest: Path
    subjects: list[dict]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [s["subject"] for s in self.subjects if s["status"] == "failed"]


# ------------------------------------------------------------------------------------------------
# A subject's results: complete and made from this request?
# ------------------------------------------------------------------------------------------------


def manifest_problem(folder: str | Path, request: SynthesisRequest | None = None) -> str | None:
    """Why ``folder`` does not hold complete results of ``request`` (None when it does)."""
    folder = Path(folder)
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as exc:
        return f"manifest.json unreadable ({exc})"
    if manifest.get("command") != "synthesize" or not isinstance(manifest.get("outputs"), list):
        return "manifest.json is not a synthesize manifest"
    kinds = {o.get("kind") for o in manifest["outputs"]}
    if not {"baseline", "synthetic", "volumes"} <= kinds:
        return "manifest.json lists no synthetic images or volumes"
    for output in manifest["outputs"]:
        target = folder / str(output.get("path", ""))
        if not target.is_file() or target.stat().st_size == 0:
            return f"output {output.get('path')} is missing or empty"
    if request is not None:
        inputs = manifest.get("inputs", {})
        want = {"image": str(Path(request.input_path).absolute()), "age": float(request.age), "cohort": request.cohort,
                "transition_age": request.transition_age, "targets": [float(t) for t in request.targets]}
        for name, value in want.items():
            if inputs.get(name) != value:
                return f"made from {name} {inputs.get(name)!r}, the table asks for {value!r}"
    return None


# ------------------------------------------------------------------------------------------------
# One subject, on a worker
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _subject_lock(path: Path, subject: str):
    """Exclusive OS lock on ``path`` (dropped by the OS when the holder dies, even by SIGKILL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        handle.close()
        raise OutputBusyError(f"{subject}: another worker is writing this subject's folder right now") from None
    try:
        yield
    finally:
        handle.close()


def synthesize_subject(job: SubjectJob) -> dict:
    """Run one subject (on a worker): returns the manifest path and whether an earlier attempt made it."""
    import torch

    from inbrainsyn.progress import Reporter
    from inbrainsyn.synthesis import run_synthesis

    outdir = Path(job.outdir)
    state = outdir.parent / STATE_DIR
    done_mark = state / f"{job.subject}.done"
    with _subject_lock(state / f"{job.subject}.lock", job.subject):
        with open(state / f"{job.subject}.attempts", "a", encoding="utf-8") as log:
            log.write(json.dumps({"run": job.run_id, "pid": os.getpid(), "time": time.time()}) + "\n")
        complete = manifest_problem(outdir, job.request) is None
        done_in_this_run = done_mark.exists() and done_mark.read_text().strip() == job.run_id
        if complete and (not job.overwrite or done_in_this_run):
            return {"manifest": str(outdir / "manifest.json"), "reused": True}
        # run_synthesis claims the folder itself (io.OutputClaim): a second writer fails with
        # OutputBusyError, and the claim removes the staging folder a killed attempt left behind
        # the affine gets no more ITK threads than the worker gives this subject (1 thread: bit-identical runs)
        request = dataclasses.replace(job.request, affine_threads=max(1, min(job.request.affine_threads, torch.get_num_threads())))
        manifest = run_synthesis(request, outdir, overwrite=job.overwrite or outdir.exists(), reporter=Reporter())
        with io.atomic_path(done_mark) as tmp:
            tmp.write_text(job.run_id)
        return {"manifest": str(manifest), "reused": False}


# ------------------------------------------------------------------------------------------------
# The batch
# ------------------------------------------------------------------------------------------------


def request_for(row: CohortRow, common: dict) -> SynthesisRequest:
    return SynthesisRequest(
        input_path=str(row.input), age=row.age, targets=list(row.targets), cohort=row.cohort,
        transition_age=row.transition_age, skull_stripped=row.skull_stripped, **common,
    )


def plan_batch(table: str | Path, outdir: str | Path, common: dict, resume: bool = False,
               overwrite: bool = False) -> tuple[list[CohortRow], dict[str, str]]:
    """Check the whole table; returns the rows and ``{subject: why skipped}`` for finished subjects.

    Every problem of every row is collected and raised together as one :class:`InputError`.
    """
    from inbrainsyn.templates import load_bank

    rows, problems = read_table(table)
    bank = load_bank(common.get("bank"))
    outdir = Path(outdir)
    skipped = {}
    for row in rows:
        where = f"line {row.line} ({row.subject})"
        unreadable = check_readable(row.input)
        if unreadable:
            problems.append(f"{where}: {unreadable}")
        request = request_for(row, common)
        try:
            request.validate_for(bank)
        except InputError as exc:
            problems.append(f"{where}: {exc}")
            continue
        folder = outdir / row.subject
        if folder.exists() and not overwrite:
            why = manifest_problem(folder, request)
            if not resume:
                problems.append(f"{where}: {folder} already exists; pass --resume to keep finished subjects "
                                "or --overwrite to redo them")
            elif why is None:
                skipped[row.subject] = "complete results from an earlier run"
            elif why.startswith("made from"):
                problems.append(f"{where}: {folder} holds results {why}; remove the folder or use another -o")
    if problems:
        raise InputError(f"{table}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(problems))
    return rows, skipped


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}" if t else None


def _subject_entry(row: CohortRow, outdir: Path, outcome: Outcome | None, skipped_why: str | None) -> dict:
    entry = {"subject": row.subject, "line": row.line, "input": str(row.input), "age": row.age, "cohort": row.cohort,
             "targets": row.targets, "transition_age": row.transition_age, "folder": row.subject}
    if skipped_why is not None:
        entry.update(status="skipped", reason=skipped_why, manifest=f"{row.subject}/manifest.json")
    elif outcome is None or outcome.status == "pending":
        entry.update(status="pending")
    else:
        record = outcome.record()
        entry.update(status=outcome.status, error=outcome.error, exit_code=outcome.exit_code,
                     traceback=record["traceback"], worker=outcome.worker, host=outcome.host, pid=outcome.pid,
                     attempts=outcome.attempts, started=_iso(outcome.started), finished=_iso(outcome.finished),
                     seconds=outcome.seconds, cpu_s=outcome.cpu_s, worker_peak_rss_mb=outcome.worker_peak_rss_mb)
        if outcome.status == "ok":
            entry.update(manifest=f"{row.subject}/manifest.json", reused=bool((outcome.value or {}).get("reused")))
    if entry["status"] in ("ok", "skipped"):
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((outdir / row.subject / "manifest.json").read_text())
            entry["timings_s"] = manifest.get("timings_s")
    return entry


def run_batch(table: str | Path, outdir: str | Path, options: ClusterOptions | None = None, common: dict | None = None,
              resume: bool = False, overwrite: bool = False, on_event=None, client=None, log=None) -> BatchResult:
    """Synthesise every subject of ``table`` into ``outdir``; returns the batch manifest and per-subject entries.

    ``options``: where to run (None and no ``client``: in this process).  ``common``: the
    :class:`SynthesisRequest` fields shared by all rows (bank, transport, device, seed).
    ``on_event(event)``: per-subject events (``{"subject", "status": started|ok|failed|skipped, ...}``).
    ``log(message)``: one-line notes (where the work runs).  Subjects that fail are listed in the
    result; raising is left to the caller.
    """
    from inbrainsyn.batch import summary
    from inbrainsyn.provenance import versions

    common = dict(common or {})
    outdir = Path(outdir).absolute()
    on_event = on_event or (lambda event: None)
    log = log or (lambda message: None)
    started = time.time()
    rows, skipped = plan_batch(table, outdir, common, resume, overwrite)
    (outdir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    jobs = {row.subject: SubjectJob(row.subject, request_for(row, common), str(outdir / row.subject), overwrite, run_id)
            for row in rows if row.subject not in skipped}
    outcomes: dict[str, Outcome] = {}
    cluster_info: dict = {"kind": "in-process"} if options is None and client is None else {}

    def write_manifest(final: bool) -> Path:
        entries = [_subject_entry(r, outdir, outcomes.get(r.subject), skipped.get(r.subject)) for r in rows]
        counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "failed", "skipped", "pending")}
        data = {
            "tool": "inbrainsyn", "command": "batch", "version": versions()["inbrainsyn"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": final,
            "table": str(Path(table).absolute()), "output": str(outdir), "resume": resume, "overwrite": overwrite,
            "parameters": common, "cluster": cluster_info, "counts": counts, "wall_s": round(time.time() - started, 3),
            "subjects": entries,
        }
        if final:
            data["outputs"] = [{"kind": "volumes", "path": "cohort_volumes.csv"}, {"kind": "report", "path": "cohort_report.png"}]
        io.write_json(data, outdir / "batch_manifest.json")
        return outdir / "batch_manifest.json"

    def on_subject(event: dict) -> None:
        key = event.get("key")
        if event.get("status") in ("ok", "failed"):  # the manifest is rewritten as subjects end
            known = {k: v for k, v in event.items() if k in Outcome.__dataclass_fields__}
            outcomes[key] = Outcome(**known)
            with contextlib.suppress(OSError):
                write_manifest(final=False)
        on_event({"subject": key, **{k: v for k, v in event.items() if k != "key"}})

    for subject, why in skipped.items():
        on_event({"subject": subject, "status": "skipped", "reason": why})
    write_manifest(final=False)
    if jobs:
        if options is None and client is None:
            result = map_subjects(synthesize_subject, jobs, on_event=on_subject)
        elif client is not None:
            cluster_info.update(kind="client", scheduler=str(client.scheduler.address))
            result = map_subjects(synthesize_subject, jobs, client=client, on_event=on_subject)
        else:
            with connect(options) as (new_client, info):
                cluster_info.update(info)
                log(f"Dask local cluster: {info['plan']}" if info["kind"] == "local" else f"Dask scheduler {options.scheduler}")
                result = map_subjects(synthesize_subject, jobs, client=new_client, on_event=on_subject)
        outcomes.update(result)
    volumes = summary.collect_volumes(outdir, [r for r in rows if r.subject in skipped or
                                               (r.subject in outcomes and outcomes[r.subject].status == "ok")])
    summary.write_cohort_volumes(volumes, outdir / "cohort_volumes.csv")
    summary.write_cohort_report(volumes, {r.subject: r for r in rows}, outdir / "cohort_report.png")
    manifest = write_manifest(final=True)
    entries = json.loads(manifest.read_text())["subjects"]
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "failed", "skipped")}
    return BatchResult(manifest, entries, counts)
