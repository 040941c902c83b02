"""A stand-in ENGINE process (not a stand-in Slicer): prints the documented JSON event stream.

Used to test the background runner (parsing, progress, cancel, failures) without running the real
engine. Behaviour is chosen by the first argument after the sub-command path:

    fake_inbrainsyn.py synthesize INPUT ... -o OUTDIR --json   writes a phantom result (engine_output.py)
    FAKE_ENGINE_MODE=fail    prints an error event and exits 4
    FAKE_ENGINE_MODE=crash   prints a traceback on stderr and exits 1 (no error event)
    FAKE_ENGINE_MODE=slow    prints progress for a minute (to be cancelled)
    FAKE_ENGINE_MODE=noisy   mixes plain-text lines with the events
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def emit(**event):
    print(json.dumps(event), flush=True)


def main(argv):
    mode = os.environ.get("FAKE_ENGINE_MODE", "ok")
    outdir = Path(argv[argv.index("-o") + 1])
    age = float(argv[argv.index("--age") + 1])
    cohort = argv[argv.index("--cohort") + 1]
    targets = []
    for token in argv[argv.index("--targets") + 1:]:
        if token.startswith("-"):
            break
        targets.append(float(token))
    transition = float(argv[argv.index("--transition-age") + 1]) if "--transition-age" in argv else None
    emit(event="log", level="info", message=f"fake engine: {' '.join(argv)}")
    if mode == "slow":
        for i in range(600):
            emit(event="progress", stage="register", fraction=i / 600, message="registering")
            time.sleep(0.1)
    if mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: out of memory", file=sys.stderr, flush=True)
        return 1
    if mode == "fail":
        emit(event="error", message="input.nii.gz: no brain found; is this a T1-weighted MRI?", exit_code=4)
        return 4
    if mode == "noisy":
        print("some library chatter", flush=True)
    for i, stage in enumerate(("load", "register", "transport", "warp", "write")):
        emit(event="progress", stage=stage, fraction=i / 5, message=stage)
    from engine_output import write_engine_output

    manifest = write_engine_output(outdir, age=age, cohort=cohort, targets=tuple(targets), transition_age=transition,
                                   input_image=str(Path(argv[1]).resolve()))
    emit(event="progress", stage="done", fraction=1.0, message="done")
    emit(event="result", manifest=str(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
