"""Shipped data of InBrainSyn-Slicer (template bank, trained weights, icons).

This folder is installed as the package ``inbrainsyn.data`` so that ``pip install .``
carries it; locate files with :func:`inbrainsyn.paths.resource_path`, never by hand.
"""
