"""The supported-versions policy: the engine installs and imports in the Python of every Slicer the
README claims (5.6, 5.8, 5.10), and installing it never replaces what those Slicers bundle.

The table (InBrainSynSlicerLib/slicer_versions.py) is read off Slicer's source at each release tag
(CMakeLists.txt's Slicer_REQUIRED_PYTHON_VERSION, SuperBuild/External_python-*.cmake,
SuperBuild/External_SimpleITK.cmake); these tests hold pyproject.toml's pins to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from py39_audit import problems_in_source, problems_in_tree
from InBrainSynSlicerLib import dependencies, slicer_versions
from InBrainSynSlicerLib.slicer_versions import SUPPORTED_RELEASES

REPO = Path(__file__).resolve().parents[2]


def project_table() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.9/3.10
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def engine_requirements() -> dict:
    return {Requirement(r).name.lower(): Requirement(r) for r in project_table()["dependencies"]}


# ---------------------------------------------------------------- the table and the pins


def test_the_table_covers_the_supported_releases():
    assert [slicer_versions.release_minor(r.tag) for r in SUPPORTED_RELEASES] == [(5, 6), (5, 8), (5, 10)]
    assert slicer_versions.MINIMUM_SLICER == (5, 6)


@pytest.mark.parametrize("release", SUPPORTED_RELEASES, ids=lambda r: r.tag)
def test_requires_python_admits_the_release_python(release):
    assert SpecifierSet(project_table()["requires-python"]).contains(release.python), \
        f"pip would refuse the engine in Slicer {release.tag} (Python {release.python})"


@pytest.mark.parametrize("release", SUPPORTED_RELEASES, ids=lambda r: r.tag)
def test_bundled_packages_satisfy_the_engine_pins(release):
    """numpy, scipy and SimpleITK as Slicer bundles them satisfy the engine's pins, so pip never wants to
    replace them (and the installer never lets it)."""
    requirements = engine_requirements()
    for name, version in (("numpy", release.numpy), ("scipy", release.scipy), ("simpleitk", release.simpleitk)):
        assert requirements[name].specifier.contains(Version(version)), (release.tag, name, version, str(requirements[name]))


@pytest.mark.parametrize("release", SUPPORTED_RELEASES, ids=lambda r: r.tag)
def test_a_torch_for_the_release_python_satisfies_the_engine_pin(release):
    """PyTorchUtils installs the newest torch with wheels for that Python (2.8.0 on Python 3.9)."""
    pin = engine_requirements()["torch"].specifier
    minimum = min(Version(s.version) for s in pin if s.operator in (">=", "=="))
    assert release.newest_torch is None or Version(release.newest_torch) >= minimum, (release.tag, str(pin))
    if release.newest_torch is not None:
        assert pin.contains(Version(release.newest_torch))


def test_the_installer_reads_the_same_requirements_as_pip():
    """dependencies.read_engine_requirements parses pyproject.toml without tomllib (not in Python 3.9)."""
    assert dependencies.read_engine_requirements(REPO) == project_table()["dependencies"]


@pytest.mark.parametrize("release", SUPPORTED_RELEASES, ids=lambda r: r.tag)
def test_install_plan_in_each_release_keeps_the_bundled_packages(release):
    bundled = {"numpy": release.numpy, "scipy": release.scipy, "SimpleITK": release.simpleitk}
    plan = dependencies.make_install_plan(
        project_table()["dependencies"], torch_installed=False, engine_installed=False,
        version_of=lambda name: bundled.get(name))
    assert plan.problems == []
    names = {dependencies.requirement_name(r).lower() for r in plan.to_install}
    assert names == {"tqdm", "matplotlib"}  # nothing Slicer bundles, and not torch
    assert plan.constraints == bundled  # pip is held to the bundled versions
    assert plan.torch_requirement == str(engine_requirements()["torch"].specifier)
    assert plan.install_engine


def test_a_slicer_whose_bundled_package_is_too_old_is_reported_not_patched():
    plan = dependencies.make_install_plan(["SimpleITK>=2.2", "tqdm>=4.60"], torch_installed=True, engine_installed=True,
                                          version_of=lambda name: {"SimpleITK": "2.1.0", "tqdm": "4.66.1"}.get(name))
    assert plan.to_install == [] and plan.nothing_to_do
    assert plan.problems and "SimpleITK 2.1.0" in plan.problems[0]


def test_version_check_at_load():
    assert "5.6 or newer" in slicer_versions.version_problem(5, 4)
    assert slicer_versions.version_problem(5, 6) is None
    assert slicer_versions.version_problem(5, 10) is None
    assert slicer_versions.version_problem(6, 0) is None


# ---------------------------------------------------------------- Python 3.9 (Slicer 5.6 and 5.8)


@pytest.mark.parametrize("folder", ["Logic/inbrainsyn", "InBrainSynSlicer"])
def test_code_run_in_slicer_is_python_39(folder):
    """The engine and the module parse with the 3.9 grammar and use no 3.10+ construct at run time."""
    assert problems_in_tree(REPO / folder) == []


@pytest.mark.parametrize("source, fragment", [
    ("match x:\n    case 1:\n        pass\n", "grammar"),
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "grammar"),
    ("isinstance(x, int | None)\n", "run time"),
    ("from pathlib import Path\nisinstance(x, str | Path)\n", "run time"),
    ("def f(x=float | None):\n    pass\n", "run time"),
    ("Alias = list[int] | None\n", "run time"),
    ("def f(x: int | None):\n    pass\n", "without 'from __future__"),
    ("list(zip(a, b, strict=True))\n", "zip(strict=)"),
    ("import dataclasses\n@dataclasses.dataclass(slots=True)\nclass A:\n    x: int = 0\n", "dataclass(slots=)"),
    ("merged = dict(a) | {'b': 1}\n", "dict | dict"),
    ("import tomllib\n", "3.11"),
    ("from itertools import pairwise\n", "newer than Python 3.9"),
])
def test_the_audit_catches_what_fails_on_python_39(source, fragment):
    problems = problems_in_source(source, "sample.py")
    assert problems and fragment in problems[0], problems


@pytest.mark.parametrize("source", [
    "from __future__ import annotations\ndef f(x: int | None = None) -> str | None:\n    return None\n",
    "from __future__ import annotations\nfrom dataclasses import dataclass\n@dataclass\nclass A:\n    x: float | None = None\n",
    "import os\nflags = os.O_CREAT | os.O_EXCL\n",
    "mask = a | b\n",
])
def test_the_audit_leaves_39_code_alone(source):
    assert problems_in_source(source, "sample.py") == []


def test_requires_python_and_the_readme_agree():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(r"Slicer\*?\*? ?5\.6, 5\.8 (and|or) 5\.10", readme), "README must name the supported Slicer versions"
