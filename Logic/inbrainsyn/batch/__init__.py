"""Cohorts: every subject of a table through the synthesize pipeline, on Dask (``inbrainsyn batch``).

``table`` reads and checks the cohort table, ``runner`` runs it (on :mod:`inbrainsyn.parallel`),
``summary`` writes the cohort's volume table and report.  See docs/batch.md.
"""

from __future__ import annotations

from inbrainsyn.batch.runner import BatchResult, manifest_problem, plan_batch, run_batch
from inbrainsyn.batch.table import CohortRow, read_table

__all__ = ["BatchResult", "CohortRow", "manifest_problem", "plan_batch", "read_table", "run_batch"]
