"""Progress reporting for long runs: tqdm bars for people, JSON lines for front ends.

The engine calls ``reporter.progress(stage, fraction, message)`` and ``reporter.log(message)``;
front ends choose the reporter.  The JSON-lines format is documented in docs/CONTRACTS.md
and parsed by the Slicer module.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from inbrainsyn.errors import InBrainSynError


class Reporter:
    """Silent reporter (base class): records stage timings only."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._stage: str | None = None
        self._stage_start = 0.0

    def _enter(self, stage: str) -> None:
        now = time.perf_counter()
        if stage != self._stage:
            if self._stage is not None:
                self.timings[self._stage] = self.timings.get(self._stage, 0.0) + now - self._stage_start
            self._stage, self._stage_start = stage, now

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self._enter(stage)

    def log(self, message: str, level: str = "info") -> None:
        pass

    def finish(self) -> dict[str, float]:
        """Close the current stage; returns seconds per stage."""
        self._enter("__done__")
        self._stage = None
        return dict(self.timings)

    def result(self, manifest_path: str) -> None:
        pass

    def error(self, message: str, exit_code: int) -> None:
        pass


class JsonLinesReporter(Reporter):
    """One JSON object per line on ``stream`` (stdout by default), flushed at once."""

    def __init__(self, stream=None) -> None:
        super().__init__()
        self.stream = stream or sys.stdout

    def _emit(self, **event) -> None:
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        super().progress(stage, fraction, message)
        self._emit(event="progress", stage=stage, fraction=round(float(fraction), 4), message=message)

    def log(self, message: str, level: str = "info") -> None:
        self._emit(event="log", level=level, message=message)

    def result(self, manifest_path: str) -> None:
        self._emit(event="result", manifest=str(manifest_path))

    def error(self, message: str, exit_code: int) -> None:
        self._emit(event="error", message=message, exit_code=exit_code)


class TqdmReporter(Reporter):
    """One overall tqdm bar (on stderr) whose description is the current stage."""

    def __init__(self) -> None:
        super().__init__()
        from tqdm import tqdm

        self.bar = tqdm(total=1000, unit="‰", bar_format="{desc:<40} {percentage:3.0f}%|{bar}| {elapsed}", file=sys.stderr)

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        super().progress(stage, fraction, message)
        self.bar.set_description_str(f"{stage}: {message}"[:40])
        self.bar.n = int(max(0.0, min(1.0, fraction)) * 1000)
        self.bar.refresh()

    def log(self, message: str, level: str = "info") -> None:
        self.bar.write(f"[{level}] {message}", file=sys.stderr)

    def finish(self) -> dict[str, float]:
        self.bar.n = self.bar.total
        self.bar.close()
        return super().finish()


class LineReporter(Reporter):
    """One plain line per stage on ``stream`` (stderr by default): for logs, pipes and CI.

    A tqdm bar redrawn into a file leaves one line per redraw (thousands per run); this writes a line
    when a stage starts and one at the end with the per-stage times.
    """

    def __init__(self, stream=None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self._started = time.perf_counter()
        self._shown: str | None = None

    def _write(self, text: str) -> None:
        self.stream.write(f"[{time.perf_counter() - self._started:7.1f} s] {text}\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        super().progress(stage, fraction, message)
        if stage != self._shown:
            self._shown = stage
            self._write(f"{stage}: {message}" if message else stage)

    def log(self, message: str, level: str = "info") -> None:
        self._write(f"[{level}] {message}")

    def finish(self) -> dict[str, float]:
        timings = super().finish()
        if timings:
            self._write("done (" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ")")
        return timings


def reporter_for(as_json: bool = False, quiet: bool = False, stream=None) -> Reporter:
    """The reporter a command line asks for: JSON lines, silent, a tqdm bar on a terminal, else one line per stage."""
    if as_json:
        return JsonLinesReporter()
    if quiet:
        return Reporter()
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return TqdmReporter()
    return LineReporter(stream)


@contextlib.contextmanager
def errors_reported(reporter: Reporter, as_json: bool):
    """Let errors propagate, but first end a JSON-lines stream with an ``error`` event.

    Front ends read the last line of the stream; an unexpected exception still gets one (exit code 1).
    """
    try:
        yield
    except InBrainSynError as exc:
        if as_json and not getattr(exc, "json_reported", False):
            reporter.error(str(exc), exc.exit_code)
            exc.json_reported = True
        raise
    except Exception as exc:
        if as_json and not getattr(exc, "json_reported", False):
            reporter.error(f"{type(exc).__name__}: {exc}", 1)
            exc.json_reported = True
        raise


class SubjectsReporter:
    """Progress over the subjects of a batch (silent base): counts ok / failed / skipped / running.

    ``subject(event)`` takes the batch engine's per-subject events
    (``{"subject", "status": "started"|"ok"|"failed"|"skipped", ...}``).
    """

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.running: set[str] = set()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}

    def subject(self, event: dict) -> None:
        status, name = event.get("status"), event.get("subject")
        if status == "started":
            self.running.add(name)
        elif status in self.counts:
            self.running.discard(name)
            self.counts[status] += 1

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return (f"{self.done}/{self.total} done: {self.counts['ok']} ok, {self.counts['failed']} failed, "
                f"{self.counts['skipped']} skipped, {len(self.running)} running")

    def result(self, manifest_path: str) -> None:
        pass

    def error(self, message: str, exit_code: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonSubjectsReporter(SubjectsReporter):
    """Per subject ``{"event": "subject", "subject", "status", ...}`` then ``{"event": "progress", "stage": "batch"}``;
    ``result`` / ``error`` as for one run (docs/CONTRACTS.md)."""

    FIELDS = ("worker", "attempts", "seconds", "error", "exit_code", "reason")

    def __init__(self, total: int = 0, stream=None) -> None:
        super().__init__(total)
        self.lines = JsonLinesReporter(stream)

    def subject(self, event: dict) -> None:
        super().subject(event)
        extra = {k: event[k] for k in self.FIELDS if event.get(k) is not None}
        self.lines._emit(event="subject", subject=event.get("subject"), status=event.get("status"), **extra)
        self.lines.progress("batch", self.done / max(self.total, 1), self.summary())

    def result(self, manifest_path: str) -> None:
        self.lines.result(manifest_path)

    def error(self, message: str, exit_code: int) -> None:
        self.lines.error(message, exit_code)


class TqdmSubjectsReporter(SubjectsReporter):
    """One tqdm bar over subjects (on stderr) with the running and failed counts."""

    def __init__(self, total: int = 0) -> None:
        super().__init__(total)
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="subject", file=sys.stderr, dynamic_ncols=True)
        self._refresh()

    def _refresh(self) -> None:
        self.bar.set_postfix_str(f"running {len(self.running)}, failed {self.counts['failed']}, "
                                 f"skipped {self.counts['skipped']}", refresh=False)
        self.bar.n = self.done
        self.bar.refresh()

    def subject(self, event: dict) -> None:
        super().subject(event)
        if event.get("status") == "failed":
            self.bar.write(f"[failed] {event.get('subject')}: {event.get('error')}", file=sys.stderr)
        self._refresh()

    def close(self) -> None:
        self.bar.close()
