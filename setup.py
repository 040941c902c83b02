"""Package layout that pyproject.toml alone cannot say: the engine lives in Logic/,
its shipped data in the top-level Resources/ (installed as ``inbrainsyn.data``)."""

from setuptools import find_packages, setup

setup(packages=find_packages("Logic") + ["inbrainsyn.data"])
