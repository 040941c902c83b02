"""Map a function over subjects, in this process or on a Dask cluster (one subject per worker at a time).

This is the engine under ``inbrainsyn batch`` and the per-subject loops of ``phantom`` (and, later,
``evaluate``): it knows nothing of synthesis.  Give it a picklable top-level function and a dict of
items keyed by subject id; it returns one :class:`Outcome` per subject, whatever happened to the others.

* **In process** (``options=None``): a plain loop, same outcomes and events.
* **Local cluster** (default of :class:`ClusterOptions`): a ``distributed.LocalCluster`` of worker
  *processes* on this machine.  Workers and threads are planned from the cores and the available
  memory (:func:`plan_local`); each worker holds one ``subject`` resource, so it runs one subject at a
  time and that subject uses all the worker's threads (torch and ITK).  With CUDA GPUs: one worker per
  GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``).
* **Existing cluster** (``ClusterOptions(scheduler="tcp://host:8786")``): SLURM/PBS via dask-jobqueue,
  Kubernetes, SSH... (docs/batch.md).  Workers that declare ``--resources subject=1`` run one subject at
  a time with all their threads; workers without it run one subject per thread, one torch thread each.

Faults: an :class:`~inbrainsyn.errors.InBrainSynError` (bad input, no brain found...) is recorded as
the subject's failure and never retried (it would fail again); any other exception is retried once
(Dask ``retries=1``); a worker that dies while running a subject (killed, out of memory) has the
subject rescheduled once on a live worker (the local scheduler's ``allowed-failures`` is 1; an
existing scheduler keeps its own setting, Dask's default is 3).  Every attempt is announced by a
``started`` event, so :attr:`Outcome.attempts` counts retries.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from inbrainsyn.errors import InBrainSynError, InputError

RESOURCE = "subject"  # worker resource: how many subjects a worker may run at once
EVENT_TOPIC = "inbrainsyn-subjects"
# Peak resident memory of one 1 mm synthesis is 1.5-1.6 GB (README, "Performance of the main job");
# a worker process adds ~0.3 GB. Workers are planned with this much memory each.
MEMORY_PER_WORKER_GB = 2.5


@dataclass
class ClusterOptions:
    """Where subjects run: an existing scheduler, or a local cluster planned from this machine."""

    scheduler: str | None = None  # address of an existing Dask scheduler ("tcp://host:8786")
    workers: int | None = None  # local worker processes (None: from cores, memory and GPUs)
    threads_per_worker: int | None = None  # threads of each local worker = threads of one subject
    device: str = "auto"  # "cpu" never plans GPU workers
    memory_per_worker_gb: float = MEMORY_PER_WORKER_GB
    dashboard: bool = False  # serve Dask's dashboard (needs bokeh) on a free port

    def validate(self) -> None:
        if self.scheduler and (self.workers is not None or self.threads_per_worker is not None):
            raise InputError("--scheduler uses the cluster's own workers: do not combine it with --workers or --threads-per-worker")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise InputError(f"--threads-per-worker must be at least 1, got {self.threads_per_worker}")


@dataclass
class LocalPlan:
    """How a local cluster is laid out, and why."""

    workers: int
    threads_per_worker: int
    devices: list[str] = field(default_factory=list)  # one CUDA device per worker, or empty (CPU)
    reason: str = ""


@dataclass
class Outcome:
    """What happened to one subject."""

    key: str
    status: str  # "ok" or "failed"
    value: Any = None
    error: str | None = None
    exit_code: int | None = None
    traceback: str | None = None
    worker: str | None = None  # Dask worker address ("in-process" without a cluster)
    host: str | None = None
    pid: int | None = None
    started: float | None = None  # unix time the last attempt started on its worker
    finished: float | None = None
    seconds: float | None = None  # run time of the last attempt on its worker
    cpu_s: float | None = None  # CPU time of the worker process during the last attempt (all its threads)
    attempts: int = 0
    worker_peak_rss_mb: float | None = None  # peak resident memory of the worker process so far

    def record(self) -> dict:
        """JSON-friendly fields (the value is left to the caller)."""
        out = asdict(self)
        out.pop("value")
        return out


# ------------------------------------------------------------------------------------------------
# Planning a local cluster
# ------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory_bytes() -> int:
    try:
        import psutil  # a dependency of distributed

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil missing or unsupported
        return 4 * 2**30


def cuda_devices() -> list[str]:
    """Indices of the CUDA devices this process may use ([] without torch or CUDA)."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


def plan_local(
    workers: int | None = None,
    threads_per_worker: int | None = None,
    cores: int | None = None,
    memory_bytes: int | None = None,
    devices: list[str] | None = None,
    memory_per_worker_gb: float = MEMORY_PER_WORKER_GB,
) -> LocalPlan:
    """Workers and threads for this machine.

    GPUs: one worker per GPU (at most ``workers`` of them), the cores shared among them.  CPU: as many
    single-subject workers as both the cores (``cores // threads``) and the memory
    (``available / memory_per_worker_gb``) allow; threads fill the cores the workers leave.
    """
    cores = max(1, cores or usable_cores())
    memory_bytes = memory_bytes if memory_bytes is not None else available_memory_bytes()
    devices = list(devices or [])
    if devices:
        chosen = devices[: workers] if workers else devices
        threads = threads_per_worker or max(1, cores // len(chosen))
        return LocalPlan(len(chosen), threads, chosen, f"one worker per GPU ({len(chosen)} of {len(devices)})")
    by_memory = max(1, int(memory_bytes / (memory_per_worker_gb * 2**30)))
    if workers is None:
        threads = threads_per_worker or max(1, cores // min(cores, by_memory))
        workers = max(1, min(cores // threads, by_memory))
        reason = (f"{cores} cores, {memory_bytes / 2**30:.1f} GiB available at {memory_per_worker_gb:g} GiB "
                  f"per worker: {workers} worker(s) x {threads} thread(s)")
    else:
        threads = threads_per_worker or max(1, cores // workers)
        reason = f"{workers} worker(s) as asked, {threads} thread(s) each"
    return LocalPlan(workers, threads, [], reason)


def _local_cluster(plan: LocalPlan, dashboard: bool):
    """A LocalCluster of worker processes (per-GPU workers see only their own device)."""
    import logging

    import dask
    from distributed import LocalCluster

    # The scheduler's HTTP server always starts: on a free port, never the busy default 8787.
    # ``dashboard``: also serve the dashboard there (needs bokeh).
    dashboard_address = ":0"
    common = dict(
        threads_per_worker=plan.threads_per_worker, processes=True, host="127.0.0.1",
        dashboard_address=dashboard_address, silence_logs=logging.CRITICAL, resources={RESOURCE: 1},
        scheduler_kwargs={"dashboard": bool(dashboard)},
    )
    # a worker that dies while running a subject: the subject is rescheduled once, then failed
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        if not plan.devices:
            return LocalCluster(n_workers=plan.workers, **common)
        cluster = _per_device_cluster_class()(devices=plan.devices, n_workers=0, **common)
        cluster.scale(len(plan.devices))
        return cluster


def _per_device_cluster_class():
    import copy

    from distributed import LocalCluster

    class PerDeviceCluster(LocalCluster):
        """LocalCluster whose worker ``i`` is started with ``CUDA_VISIBLE_DEVICES=devices[i]``."""

        def __init__(self, devices: list[str], **kwargs):
            self.devices = [str(d) for d in devices]
            super().__init__(**kwargs)

        def new_worker_spec(self):
            free = [d for d in self.devices if f"gpu-{d}" not in self.worker_spec]
            if not free:
                raise ValueError(f"all {len(self.devices)} GPUs already have a worker")
            spec = copy.deepcopy(self.new_spec)
            spec["options"]["env"] = {**spec["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": free[0]}
            return {f"gpu-{free[0]}": spec}

    return PerDeviceCluster


def require_dask() -> None:
    """Raise a clear error when Dask is not installed (it is an optional dependency of the engine)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError("running on a Dask cluster needs dask[distributed]: pip install \"inbrainsyn[batch]\" "
                         "(or pip install \"dask[distributed]\")") from None


@contextlib.contextmanager
def connect(options: ClusterOptions):
    """Yield ``(client, description)``: a new local cluster (closed afterwards) or the given scheduler."""
    options.validate()
    require_dask()
    from distributed import Client

    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {options.scheduler} ({exc}); "
                             "check the address and that the scheduler is running") from None
        try:
            yield client, {"kind": "existing", "scheduler": options.scheduler}
        finally:
            client.close()
        return
    devices = [] if options.device == "cpu" else cuda_devices()
    plan = plan_local(options.workers, options.threads_per_worker, devices=devices,
                      memory_per_worker_gb=options.memory_per_worker_gb)
    cluster = _local_cluster(plan, options.dashboard)
    try:
        client = Client(cluster)
        try:
            client.wait_for_workers(plan.workers, timeout=120)
            yield client, {"kind": "local", "workers": plan.workers, "threads_per_worker": plan.threads_per_worker,
                           "devices": plan.devices, "plan": plan.reason,
                           "dashboard": cluster.dashboard_link if options.dashboard else None}
        finally:
            client.close()
    finally:
        cluster.close()


# ------------------------------------------------------------------------------------------------
# Running one item (on a worker or in this process)
# ------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float | None:
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
    except Exception:  # pragma: no cover - Windows
        return None


@contextlib.contextmanager
def thread_limit(count: int | None):
    """Run torch and ITK with ``count`` threads inside the block (None: leave them as they are)."""
    if not count:
        yield
        return
    import SimpleITK as sitk
    import torch

    before_torch, before_itk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(count)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before_itk)


def _dask_worker():
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def run_item(fn: Callable, key: str, item: Any, threads: int | None = None, per_worker_threads: bool = False,
             notify: Callable[[dict], None] | None = None) -> dict:
    """Run ``fn(item)`` for subject ``key``; returns the attempt's record.

    An :class:`InBrainSynError` becomes ``status: failed`` (not retried); other exceptions propagate
    (the cluster retries them once).  ``per_worker_threads``: use all of the Dask worker's threads.
    """
    worker = _dask_worker()
    address = worker.address if worker is not None else "in-process"
    if per_worker_threads and worker is not None:
        threads = worker.state.nthreads
    base = {"key": key, "worker": address, "host": socket.gethostname(), "pid": os.getpid()}
    started = time.time()
    event = {**base, "status": "started", "started": started}
    if worker is not None:
        worker.log_event(EVENT_TOPIC, event)
    elif notify is not None:
        notify(event)
    record = {**base, "status": "ok", "value": None, "error": None, "exit_code": None, "started": started}
    cpu_started = time.process_time()
    with thread_limit(threads):
        try:
            record["value"] = fn(item)
        except InBrainSynError as exc:
            record.update(status="failed", error=str(exc), exit_code=exc.exit_code)
    finished = time.time()
    record.update(finished=finished, seconds=round(finished - started, 3), cpu_s=round(time.process_time() - cpu_started, 3),
                  worker_peak_rss_mb=_peak_rss_mb())
    return record


def _error_text(exc: BaseException) -> tuple[str, str | None]:
    if type(exc).__name__ == "KilledWorker":
        return ("the worker running this subject died twice (killed, or out of memory: each 1 mm synthesis "
                "needs ~1.6 GB; try fewer --workers)"), None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return f"{type(exc).__name__}: {exc}", tb


# ------------------------------------------------------------------------------------------------
# Mapping over subjects
# ------------------------------------------------------------------------------------------------


def map_subjects(
    fn: Callable[[Any], Any],
    items: Mapping[str, Any],
    options: ClusterOptions | None = None,
    on_event: Callable[[dict], None] | None = None,
    client=None,
    threads: int | None = None,
) -> dict[str, Outcome]:
    """``fn(item)`` for every ``(key, item)``; returns ``{key: Outcome}`` in the order of ``items``.

    ``options=None`` and no ``client``: in this process, one after the other.  Otherwise on Dask
    (a new local cluster from ``options``, or ``client`` -- a ``distributed.Client`` -- when given;
    a Client may also be passed as ``options``).  ``on_event(event)`` is called in
    this thread with ``{"key", "status": "started"|"ok"|"failed", "worker", ...}`` as subjects start and
    end (attempts included).  ``threads``: torch/ITK threads per subject on workers without the
    ``subject`` resource (default 1); workers with it use all their threads.
    """
    on_event = on_event or (lambda event: None)
    if options is not None and hasattr(options, "submit"):  # a distributed.Client given as the options
        options, client = None, options
    if options is None and client is None:
        return _map_in_process(fn, items, on_event)
    if client is not None:
        return _map_on_dask(fn, items, client, on_event, threads)
    with connect(options) as (new_client, _):
        return _map_on_dask(fn, items, new_client, on_event, threads)


def _finish(outcomes: dict[str, Outcome], record: dict, on_event) -> None:
    outcome = outcomes[record["key"]]
    for name in ("status", "value", "error", "exit_code", "worker", "host", "pid", "started", "finished", "seconds",
                 "cpu_s", "worker_peak_rss_mb"):
        if name in record:
            setattr(outcome, name, record[name])
    outcome.attempts = max(outcome.attempts, 1)
    on_event({k: v for k, v in outcome.record().items() if k != "traceback"})


def _map_in_process(fn, items, on_event) -> dict[str, Outcome]:
    outcomes = {key: Outcome(key=key, status="pending") for key in items}

    def notify(event):
        outcomes[event["key"]].attempts += 1
        on_event(event)

    for key, item in items.items():
        try:
            record = run_item(fn, key, item, notify=notify)
        except Exception as exc:  # noqa: BLE001 - one subject's failure must not stop the others
            error, tb = _error_text(exc)
            record = {"key": key, "status": "failed", "error": error, "exit_code": 1, "finished": time.time()}
            outcomes[key].traceback = tb
        _finish(outcomes, record, on_event)
    return outcomes


def _has_subject_resource(client) -> bool:
    workers = client.scheduler_info().get("workers", {}).values()
    return bool(workers) and all(RESOURCE in (w.get("resources") or {}) for w in workers)


def _map_on_dask(fn, items, client, on_event, threads) -> dict[str, Outcome]:
    inbox: queue.Queue = queue.Queue()
    outcomes = {key: Outcome(key=key, status="pending") for key in items}
    client.subscribe_topic(EVENT_TOPIC, lambda event: inbox.put(("event", event[1] if isinstance(event, tuple) else event)))
    limited = _has_subject_resource(client)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    futures = {}
    try:
        for key, item in items.items():
            future = client.submit(
                run_item, fn, key, item, threads or 1, limited,
                key=f"inbrainsyn-{key}-{run_id}", pure=False, retries=1,
                resources={RESOURCE: 1} if limited else None,
            )
            future.add_done_callback(lambda f, k=key: inbox.put(("done", k)))
            futures[key] = future
        remaining = set(futures)
        while remaining:
            kind, payload = inbox.get()
            if kind == "event":
                if payload.get("key") in outcomes and payload.get("status") == "started" and payload["key"] in remaining:
                    outcomes[payload["key"]].attempts += 1
                    on_event(payload)
                continue
            key = payload
            if key not in remaining:
                continue
            remaining.discard(key)
            future = futures[key]
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 - recorded, the others go on
                error, tb = _error_text(exc)
                record = {"key": key, "status": "failed", "error": error, "exit_code": 1, "finished": time.time()}
                outcomes[key].traceback = tb
            _finish(outcomes, record, on_event)
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(EVENT_TOPIC)
        pending = [f for f in futures.values() if not f.done()]
        if pending:
            with contextlib.suppress(Exception):
                client.cancel(pending)
    return outcomes
