"""What the module needs in Slicer's Python, where the engine's source ships, and how to install it.

Installing never touches what Slicer bundles (numpy, scipy, SimpleITK: Slicer builds SimpleITK
with its own ImageIO, and pip replacing it breaks Slicer; see ``slicer_versions``):

1. torch through the PyTorch extension (``PyTorchUtils``), asked for the engine's minimum version;
   it picks the CPU or the right CUDA build for this computer;
2. the engine itself with ``pip install --no-deps`` from the extension's own folder;
3. only those of the engine's other requirements that are missing or too old (tqdm, matplotlib),
   with a constraints file that holds every bundled package at its installed version, so pip's
   resolver can never upgrade or downgrade them.

Every step is a background command (:class:`CommandChain`), read by the same Qt timer as an engine
run, so Slicer stays responsive and shows pip's output as it comes.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from .engine import EngineOutcome, EngineProcess
from .slicer_versions import SLICER_BUNDLED_PACKAGES, TORCH_PACKAGES

# Folder name the extension's CMake install gives the engine source, next to the module file.
PACKAGED_ENGINE_FOLDER = "InBrainSynEngine"
# What PyTorchUtils itself installs before it runs light-the-torch (PyTorchUtils._installLightTheTorch).
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"


def engine_source_dir(module_dir) -> Path | None:
    """The folder to ``pip install`` the engine from, or None.

    Packaged extension: ``<module dir>/InBrainSynEngine`` (installed by CMakeLists.txt).
    Source checkout ("Add additional module paths" = ``<repo>/InBrainSynSlicer``): the
    repository root, which holds pyproject.toml and Logic/inbrainsyn.
    """
    module_dir = Path(module_dir)
    for candidate in (module_dir / PACKAGED_ENGINE_FOLDER, module_dir.parent):
        if (candidate / "pyproject.toml").is_file() and (candidate / "Logic" / "inbrainsyn").is_dir():
            return candidate
    return None


def missing_python_packages() -> list[str]:
    """Which of torch / inbrainsyn this Python cannot import (checked without importing them)."""
    return [name for name in ("torch", "inbrainsyn") if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------- the engine's requirements


def read_engine_requirements(source_dir) -> list[str]:
    """The ``[project] dependencies`` of the engine's pyproject.toml, e.g. ``["torch>=2.1", ...]``.

    A small reader (Slicer 5.6/5.8 ship Python 3.9, which has no ``tomllib``): the list of quoted
    strings between ``dependencies = [`` and the closing ``]`` of the ``[project]`` table.
    """
    text = (Path(source_dir) / "pyproject.toml").read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project is None:
        raise ValueError(f"{source_dir}/pyproject.toml has no [project] table")
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", project.group(1), re.M | re.S)
    if block is None:
        raise ValueError(f"{source_dir}/pyproject.toml has no [project] dependencies")
    body = "\n".join(line.split("#", 1)[0] for line in block.group(1).splitlines())
    return re.findall(r"[\"']([^\"']+)[\"']", body)


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    """Version of an installed distribution, or None (not installed, or installed without metadata)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_satisfies(version: str, requirement: str) -> bool:
    from packaging.requirements import Requirement
    from packaging.version import Version

    return Requirement(requirement).specifier.contains(Version(version), prereleases=True)


@dataclass
class InstallPlan:
    """What an installation will do, decided before anything is installed (shown to the user first)."""

    torch_requirement: str | None = None        # e.g. ">=2.1" when torch must be installed, else None
    install_engine: bool = False
    to_install: list = field(default_factory=list)        # requirements pip installs (missing or too old)
    kept: list = field(default_factory=list)              # (requirement, installed version): bundled, untouched
    problems: list = field(default_factory=list)          # sentences: a bundled package that is too old
    constraints: dict = field(default_factory=dict)       # name -> installed version, held by pip

    @property
    def nothing_to_do(self) -> bool:
        return self.torch_requirement is None and not self.install_engine and not self.to_install

    def summary(self) -> str:
        lines = []
        if self.torch_requirement is not None:
            lines.append(f"PyTorch (torch{self.torch_requirement}) through the PyTorch extension, which picks the "
                         "CPU or CUDA build for this computer")
        if self.install_engine:
            lines.append("the InBrainSyn engine from this extension's folder (without its dependencies)")
        if self.to_install:
            lines.append("from PyPI: " + ", ".join(self.to_install))
        if self.kept:
            lines.append("kept as Slicer bundles them: " + ", ".join(f"{_name} {v}" for _name, v in self.kept))
        return "\n".join("- " + line for line in lines)


def make_install_plan(requirements, *, torch_installed: bool, engine_installed: bool, reinstall_engine: bool = False,
                      version_of=installed_version) -> InstallPlan:
    """Decide what to install for ``requirements`` (the engine's pyproject dependencies).

    Bundled packages (numpy, scipy, SimpleITK) are never installed; if the bundled version does not
    satisfy the engine's pin, that is a problem to report (a pin to fix in pyproject.toml), not a
    reason to replace Slicer's copy. torch is left to PyTorchUtils with the engine's minimum version.
    """
    plan = InstallPlan(install_engine=reinstall_engine or not engine_installed)
    bundled = {_canonical(n) for n in SLICER_BUNDLED_PACKAGES}
    torch_names = {_canonical(n) for n in TORCH_PACKAGES}
    for requirement in requirements:
        name = requirement_name(requirement)
        key = _canonical(name)
        version = version_of(name)
        if key in torch_names:
            too_old = torch_installed and version is not None and not version_satisfies(version.split("+")[0], requirement)
            if not torch_installed or too_old:  # PyTorchUtils installs (or upgrades) it
                plan.torch_requirement = requirement[len(name):].strip() or ""
            continue
        if key in bundled:
            plan.kept.append((name, version or "bundled"))
            if version is not None:
                plan.constraints[name] = version
                if not version_satisfies(version, requirement):
                    plan.problems.append(
                        f"Slicer bundles {name} {version}, but the engine asks for {requirement}; "
                        "this Slicer is not supported by this engine version (see the README's supported versions).")
            continue
        if version is None or not version_satisfies(version, requirement):
            plan.to_install.append(requirement)
    return plan


def install_commands(plan: InstallPlan, python: str, source_dir, constraints_file, torch_args=None) -> list:
    """The background commands that carry out ``plan``, in order (each an argv list).

    ``torch_args``: the light-the-torch arguments PyTorchUtils uses for the engine's torch requirement
    (``PyTorchUtilsLogic._getPipInstallArguments``), or None when torch is already installed.
    ``constraints_file`` is written here: one ``name==version`` line per bundled package.
    """
    constraints = Path(constraints_file)
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(plan.constraints.items())),
                           encoding="utf-8")
    pip = [python, "-m", "pip"]
    commands = []
    if torch_args is not None:
        if importlib.util.find_spec("light_the_torch") is None:
            commands.append([*pip, "install", LIGHT_THE_TORCH_REQUIREMENT, "-c", str(constraints)])
        commands.append([python, "-m", "light_the_torch", *torch_args])
    if plan.install_engine:
        commands.append([*pip, "install", "--upgrade", "--no-deps", str(source_dir)])
    if plan.to_install:
        commands.append([*pip, "install", *plan.to_install, "-c", str(constraints)])
    return commands


class CommandChain:
    """Background commands run one after the other; the same polling interface as EngineProcess.

    Stops at the first failure; ``cancel()`` ends the running command's whole process tree.
    """

    def __init__(self, commands, env: dict | None = None):
        self.commands = [list(c) for c in commands]
        self.env = env
        self.argv = [" && ".join(" ".join(c) for c in self.commands)]
        self._index = -1
        self._current: EngineProcess | None = None
        self._final: EngineOutcome | None = None
        self._pending_events: list = []

    def start(self) -> "CommandChain":
        self._next()
        return self

    def _next(self) -> None:
        self._index += 1
        if self._index >= len(self.commands):
            self._final = EngineOutcome("succeeded", 0, message="Installed.")
            self._current = None
            return
        argv = self.commands[self._index]
        self._pending_events.append({"event": "progress", "stage": "install", "fraction": self._index / len(self.commands),
                                     "message": " ".join(argv)})
        self._current = EngineProcess(argv, env=self.env, plain=True).start()

    def poll(self) -> list:
        events, self._pending_events = self._pending_events, []
        if self._current is not None:
            events += self._current.poll()
            outcome = self._current.outcome()
            if outcome is not None:
                events += self._current.poll()
                if outcome.succeeded:
                    self._next()
                else:
                    self._final = outcome
                    self._current = None
        return events

    def is_running(self) -> bool:
        return self._final is None

    def outcome(self) -> EngineOutcome | None:
        return self._final

    def cancel(self, grace_s: float = 3.0) -> None:
        if self._current is not None:
            self._current.cancel(grace_s=grace_s)
            self._final = EngineOutcome("cancelled", None, message="Installation cancelled.")
            self._current = None

    def wait(self, timeout: float | None = None, poll_s: float = 0.05, on_event=None) -> EngineOutcome | None:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running():
            for event in self.poll():
                if on_event:
                    on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(poll_s)
        return self._final
