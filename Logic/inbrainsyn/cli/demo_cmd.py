"""``inbrainsyn demo``: the whole job on the shipped demo subject, HC and AD, three target ages."""

from __future__ import annotations

import json
import time
from pathlib import Path

from inbrainsyn.errors import InputError

DEMO_TARGETS = (75.0, 80.0, 85.0)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole job on the shipped demo subject (HC and AD, ages 75/80/85)",
        description="Synthesise the shipped demo subject (a synthetic phantom scan with skull, age 70) at ages "
        "75, 80 and 85 under healthy ageing and under Alzheimer's disease, and print where the reports are.",
    )
    parser.add_argument("-o", "--output", default="inbrainsyn-demo", help="output folder (default: ./inbrainsyn-demo)")
    parser.set_defaults(func=run)


def demo_subject() -> tuple[Path, dict]:
    """The shipped demo scan and its description (age, provenance)."""
    from inbrainsyn.paths import resource_path

    info_path = resource_path("demo", "subject.json")
    if not info_path.exists():
        raise InputError(f"the demo subject is missing from this installation ({info_path}); reinstall inbrainsyn")
    info = json.loads(info_path.read_text())
    return info_path.parent / info["image"], info


def run(args) -> int:
    from inbrainsyn import io
    from inbrainsyn.cli.synthesize_cmd import execute
    from inbrainsyn.synthesis import SynthesisRequest

    image, info = demo_subject()
    out = Path(args.output)
    io.check_output_path(out, args.overwrite)
    started = time.perf_counter()
    reports = []
    for cohort in ("HC", "AD"):
        request = SynthesisRequest(
            input_path=str(image), age=float(info["age"]), targets=list(DEMO_TARGETS), cohort=cohort, device=args.device
        )
        args.output = str(out / cohort)
        execute(request, args)
        reports.append(out / cohort / "report.png")
    if not args.json:
        print(f"demo finished in {time.perf_counter() - started:.0f} s")
        for report in reports:
            print(f"report: {report.absolute()}")
    return 0
