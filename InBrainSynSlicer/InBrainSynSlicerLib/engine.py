"""Run the ``inbrainsyn`` engine in a background process and read its JSON event stream.

Plain Python (subprocess, threads, json): the Slicer widget polls :meth:`EngineProcess.poll`
from a Qt timer, so the GUI never waits on the engine; pytest drives the same class with a
small fake engine script.

Event stream (docs/CONTRACTS.md), one JSON object per stdout line::

    {"event": "progress", "stage": "...", "fraction": 0.0-1.0, "message": "..."}
    {"event": "log", "level": "info|warning", "message": "..."}
    {"event": "result", "manifest": "/abs/OUTDIR/manifest.json"}     last line on success
    {"event": "error", "message": "...", "exit_code": N}                last line on failure
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Ages the templates cover: OASIS-3 training scans span 43.5-95.7 years (METHODS.md); a little
# margin either side, beyond which the template ageing is extrapolation and refused.
AGE_MIN = 40.0
AGE_MAX = 100.0
COHORTS = ("HC", "AD")
TRANSPORT_METHODS = ("pole", "schild", "conjugation", "half-conjugation", "none")
DEVICES = ("auto", "cpu", "cuda")
ENGINE_ENVIRONMENT_VARIABLE = "INBRAINSYN_ENGINE"
# Ageing pace: the percentile of the cohort's ageing speed (``inbrainsyn synthesize --pace P``);
# 50 is the cohort's median and the engine's default, so the module passes --pace only when it differs
# (an engine older than --pace then still runs every default request).
PACE_MIN = 1
PACE_MAX = 99
PACE_DEFAULT = 50

# Windows process-creation flags (subprocess has them only on Windows; values from the Win32 API).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


class EngineMissingError(Exception):
    """The ``inbrainsyn`` engine cannot be started (not installed, or the command is wrong)."""


@dataclass(frozen=True)
class SynthesisRequest:
    """Everything ``inbrainsyn synthesize`` needs; built from the module's parameter node."""

    input_path: str
    age: float
    cohort: str
    targets: tuple
    output_dir: str
    transition_age: float | None = None
    method: str = "pole"
    device: str = "auto"
    bank: str | None = None
    skull_stripped: bool = False
    pace: int = PACE_DEFAULT


@dataclass
class EngineOutcome:
    """How a run ended: ``status`` is "succeeded", "failed" or "cancelled"."""

    status: str
    exit_code: int | None
    manifest: str | None = None
    message: str = ""
    stderr_tail: list = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


# ---------------------------------------------------------------- values from the GUI


def parse_target_ages(text: str) -> list[float]:
    """Target ages typed as "75, 80 85" -> [75.0, 80.0, 85.0] (sorted, duplicates removed).

    Raises ValueError naming the entry that is not a number.
    """
    ages = []
    for token in text.replace(";", ",").replace(",", " ").split():
        try:
            ages.append(float(token))
        except ValueError:
            raise ValueError(f"target age {token!r} is not a number; type ages in years, e.g. 75, 80, 85") from None
    return sorted(set(ages))


def check_ages(age: float, cohort: str, targets, conversion_enabled: bool = False,
               conversion_age: float | None = None) -> list[str]:
    """Problems with the chosen ages, as sentences for the user (empty list: all fine).

    Rules: baseline and targets within [AGE_MIN, AGE_MAX]; at least one target; every target
    after the baseline (the engine synthesises future scans); conversion to AD only from a
    healthy (HC) baseline, at an age after the baseline and not after the last target.
    """
    problems = []
    if not AGE_MIN <= age <= AGE_MAX:
        problems.append(f"Patient age {age:g} is outside the range the templates cover ({AGE_MIN:g}-{AGE_MAX:g} years).")
    if cohort not in COHORTS:
        problems.append(f"Cohort {cohort!r} is unknown; choose HC (healthy ageing) or AD (Alzheimer's disease).")
    targets = list(targets)
    if not targets:
        problems.append("Give at least one target age (years), e.g. 75, 80, 85.")
    for target in targets:
        if not AGE_MIN <= target <= AGE_MAX:
            problems.append(f"Target age {target:g} is outside {AGE_MIN:g}-{AGE_MAX:g} years.")
        elif target <= age:
            problems.append(f"Target age {target:g} is not after the patient's age {age:g}; targets must be future ages.")
    if conversion_enabled:
        if cohort != "HC":
            problems.append("Conversion to AD needs a healthy (HC) baseline; set the cohort to HC.")
        if conversion_age is None:
            problems.append("Give the age of conversion to AD.")
        elif targets and not age < conversion_age <= max(targets):
            problems.append(
                f"Conversion age {conversion_age:g} must lie after the patient's age {age:g} and not after the last target {max(targets):g}."
            )
    return problems


# ---------------------------------------------------------------- command lines


def find_engine(python_executable: str | None = None, environ=None, probe: bool = True) -> list[str]:
    """The command prefix that starts the engine, e.g. ``[".../PythonSlicer", "-m", "inbrainsyn"]``.

    Order: the ``INBRAINSYN_ENGINE`` environment variable (a command line, e.g. the
    ``inbrainsyn`` of another Python environment), then ``python -m inbrainsyn`` with
    ``python_executable`` (Slicer's own Python, where the module installs the engine).
    Raises EngineMissingError with what to do when neither works.

    ``probe=False``: ``python_executable`` runs *this* Python's environment (Slicer's PythonSlicer
    launches the interpreter Slicer embeds), so look the engine up in-process
    (``importlib.util.find_spec``, instant) instead of starting a probe process, which can take
    seconds and must not run on Slicer's GUI thread.
    """
    environ = os.environ if environ is None else environ
    custom = environ.get(ENGINE_ENVIRONMENT_VARIABLE, "").strip()
    if custom:
        return shlex.split(custom, posix=os.name != "nt")
    python = python_executable or sys.executable
    if probe:
        try:
            found = subprocess.run(
                [python, "-c", "import inbrainsyn, inbrainsyn.cli"], capture_output=True, text=True, timeout=120,
                **popen_platform_kwargs(new_group=False),
            ).returncode == 0
        except (OSError, subprocess.TimeoutExpired):  # no such Python, or it hangs
            found = False
    else:
        found = importlib.util.find_spec("inbrainsyn") is not None
    if not found:
        raise EngineMissingError(
            f"The InBrainSyn engine is not installed in {python}. Press 'Install dependencies' in the "
            f"InBrainSyn module (or set {ENGINE_ENVIRONMENT_VARIABLE} to an inbrainsyn command)."
        )
    return [python, "-m", "inbrainsyn"]


def _age_text(age: float) -> str:
    return f"{float(age):g}"


def synthesize_argv(engine: list[str], request: SynthesisRequest) -> list[str]:
    """``inbrainsyn synthesize INPUT --age A --cohort C --targets T.. -o DIR --json [...]``.

    ``-o`` must not exist yet (the engine refuses to overwrite without --overwrite).
    """
    argv = [*engine, "synthesize", request.input_path, "--age", _age_text(request.age), "--cohort", request.cohort,
            "--targets", *[_age_text(t) for t in request.targets], "-o", request.output_dir,
            "--transport", request.method, "--device", request.device, "--json"]
    if request.transition_age is not None:
        argv += ["--transition-age", _age_text(request.transition_age)]
    if request.bank:
        argv += ["--bank", request.bank]
    if request.skull_stripped:
        argv += ["--skull-stripped"]
    if int(request.pace) != PACE_DEFAULT:
        argv += ["--pace", str(int(request.pace))]
    return argv


def preview_argv(engine: list[str], input_path: str, age: float, cohort: str, targets, slice_index: int,
                 output_dir: str, alignment: str | None = None) -> list[str]:
    """``inbrainsyn daninet preview INPUT --age A --cohort HC|AD --targets T.. --native-slice K -o DIR --json``.

    K is the axial slice of the *input's own grid* under the Red view (the user's "current
    slice"); the engine maps it to the template slice through its affine alignment (``--slice``
    of the engine counts slices of the template grid, which the GUI cannot know beforehand) and
    refuses, saying why and naming the input's usable slices, when it falls outside the model's band
    (the shipped model covers every template slice with at least 20 % brain).
    With ``--json`` the engine reports progress and ends with a result or error event; the
    runner also accepts a clean exit that leaves ``DIR/manifest.json`` (``expected_manifest``).
    ``alignment``: the manifest of an earlier run of the same volume whose affine the engine reuses
    instead of aligning again (``--alignment``; the engine refuses one of a scan on another grid).
    """
    argv = [*engine, "daninet", "preview", input_path, "--age", _age_text(age), "--cohort", cohort,
            "--targets", *[_age_text(t) for t in targets], "--native-slice", str(int(slice_index)), "-o", output_dir]
    if alignment:
        argv += ["--alignment", str(alignment)]
    return argv + ["--json"]


def parse_event_line(line: str) -> dict | None:
    """One stdout line -> event dict; plain text (e.g. a library's print) becomes a log event."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            return event
    return {"event": "log", "level": "output", "message": text}


def explain_failure(exit_code: int | None, error_message: str, stderr_tail: list) -> str:
    """One clear sentence for the user from whatever the engine left behind."""
    if error_message:
        return error_message
    joined = "\n".join(stderr_tail)
    if exit_code == 2 and "usage: inbrainsyn" in joined:
        # argparse's answer: the engine does not know the command line the module sent.
        return ("This version of the InBrainSyn engine does not accept the module's command (module and engine "
                "versions differ); update the engine ('Install dependencies' reinstalls it from the extension). "
                "Details:\n" + joined)
    if joined:
        return f"The engine stopped with exit code {exit_code}:\n{joined}"
    return f"The engine stopped with exit code {exit_code} and no message."


# ---------------------------------------------------------------- the background process


def popen_platform_kwargs(os_name: str | None = None, new_group: bool = True, startupinfo_factory=None) -> dict:
    """Extra ``subprocess.Popen`` arguments so a background command behaves on every OS.

    Windows: no console window (``CREATE_NO_WINDOW`` and a hidden ``STARTUPINFO``, as Slicer's
    ``slicer.util.launchConsoleProcess`` does) and, with ``new_group``, its own process group.
    POSIX: with ``new_group``, its own session (process group), so that :func:`kill_tree` reaches
    the engine's children (DataLoader workers, pip's build back-ends) too.
    """
    os_name = os.name if os_name is None else os_name
    if os_name == "nt":
        factory = startupinfo_factory or getattr(subprocess, "STARTUPINFO")
        info = factory()
        info.dwFlags |= STARTF_USESHOWWINDOW
        info.wShowWindow = SW_HIDE
        flags = CREATE_NO_WINDOW | (CREATE_NEW_PROCESS_GROUP if new_group else 0)
        return {"creationflags": flags, "startupinfo": info}
    return {"start_new_session": True} if new_group else {}


def kill_tree_argv(pid: int) -> list[str]:
    """Windows: end ``pid`` and every process it started, at once. Without ``/F`` taskkill only *asks*
    (WM_CLOSE), which a window-less console process never receives; ``/T`` takes the whole tree."""
    return ["taskkill", "/F", "/T", "/PID", str(int(pid))]


def kill_tree(pid: int, terminate: bool, os_name: str | None = None) -> None:
    """Stop a process started with :func:`popen_platform_kwargs` and everything it started.

    POSIX: SIGTERM (``terminate``) or SIGKILL to its process group (its id is the leader's pid, which
    stays valid while any member lives, even after the leader exited). Windows: ``taskkill /F /T``
    (there is no polite stop for a window-less console process).
    """
    os_name = os.name if os_name is None else os_name
    if os_name == "nt":
        subprocess.run(kill_tree_argv(pid), capture_output=True, **popen_platform_kwargs(os_name, new_group=False))
        return
    try:
        os.killpg(int(pid), signal.SIGTERM if terminate else signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class EngineProcess:
    """One engine run in a child process, read by two daemon threads.

    ``poll()`` returns the events parsed so far without blocking; ``cancel()`` stops the whole
    process group (the engine and anything it started); ``outcome()`` tells how it ended.
    """

    def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None, stderr_lines: int = 40,
                 expected_manifest: str | None = None, plain: bool = False):
        """``expected_manifest``: for a command that may print no JSON events (an older ``daninet preview``), a
        clean exit leaving this file counts as success. ``plain``: a command that is not the engine (pip): exit
        code 0 is success."""
        self.argv = list(argv)
        self.expected_manifest = expected_manifest
        self.plain = plain
        self.env = env
        self.cwd = cwd
        self._events: queue.Queue = queue.Queue()
        self._stderr = collections.deque(maxlen=stderr_lines)
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._cancelled = False
        self._last_result: str | None = None
        self._last_error: str = ""

    # -- starting
    def start(self) -> "EngineProcess":
        kwargs = popen_platform_kwargs()  # own process group, no console window on Windows
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # events arrive as they are printed
        try:
            self._process = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=self.cwd, **kwargs,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise EngineMissingError(f"cannot start the engine {self.argv[0]!r}: {exc.strerror}") from None
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            event = parse_event_line(line)
            if event is None:
                continue
            if event.get("event") == "result":
                self._last_result = event.get("manifest")
            elif event.get("event") == "error":
                self._last_error = str(event.get("message", ""))
            self._events.put(event)

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            line = line.rstrip("\n")
            if line:
                self._stderr.append(line)
                self._events.put({"event": "log", "level": "stderr", "message": line})

    # -- watching
    def poll(self) -> list[dict]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def is_running(self) -> bool:
        if self._process is None:
            return False
        if self._process.poll() is None:
            return True
        return any(thread.is_alive() for thread in self._threads)

    def wait(self, timeout: float | None = None) -> EngineOutcome | None:
        """Wait until the process ended and its output is read; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.outcome()

    # -- stopping
    def cancel(self, grace_s: float = 3.0) -> None:
        """Stop the engine and every process it started.

        POSIX: SIGTERM to its process group (the engine cleans up its temporary folder), then SIGKILL to
        the group once the engine exited or ``grace_s`` passed, so no child outlives it. Windows:
        ``taskkill /F /T`` at once.
        """
        if self._process is None or self._process.poll() is not None:
            return
        self._cancelled = True
        pid = self._process.pid
        kill_tree(pid, terminate=True)
        try:
            self._process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        kill_tree(pid, terminate=False)  # the stragglers (or the engine itself after the grace period)
        self._process.wait()

    # -- the end
    def outcome(self) -> EngineOutcome | None:
        """How the run ended, or None while it is still running."""
        if self.is_running():
            return None
        code = self._process.returncode
        tail = list(self._stderr)
        if self._cancelled:
            return EngineOutcome("cancelled", code, message="Cancelled; nothing was added to the scene.", stderr_tail=tail)
        if code == 0 and self.plain:
            return EngineOutcome("succeeded", code, stderr_tail=tail)
        if code == 0 and self._last_result:
            return EngineOutcome("succeeded", code, manifest=self._last_result, stderr_tail=tail)
        if code == 0 and self.expected_manifest and Path(self.expected_manifest).is_file():
            return EngineOutcome("succeeded", code, manifest=str(self.expected_manifest), stderr_tail=tail)
        if code == 0:
            message = "The engine finished without announcing its results (no 'result' event)."
            return EngineOutcome("failed", code, message=message, stderr_tail=tail)
        return EngineOutcome("failed", code, message=explain_failure(code, self._last_error, tail), stderr_tail=tail)


def run_engine(argv: list[str], on_event=None, should_cancel=None, poll_s: float = 0.05,
               env: dict | None = None) -> EngineOutcome:
    """Run the engine to the end (for scripts and the self-test); ``on_event(event)`` per event,
    ``should_cancel()`` checked every ``poll_s`` seconds."""
    process = EngineProcess(argv, env=env).start()
    while process.is_running():
        for event in process.poll():
            if on_event:
                on_event(event)
        if should_cancel and should_cancel():
            process.cancel()
        time.sleep(poll_s)
    for event in process.poll():
        if on_event:
            on_event(event)
    return process.wait()


def output_folder_for(base_dir, input_name: str) -> Path:
    """A new, empty run folder ``base_dir/<input>-YYYYmmdd-HHMMSS[-n]`` (never an existing one)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in input_name) or "input"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:  # mkdir is the exclusive claim: two Slicer windows in the same second get two folders
        candidate = base / (f"{safe}-{stamp}" if n == 1 else f"{safe}-{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
