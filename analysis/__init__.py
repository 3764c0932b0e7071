"""Scaling-law analysis of steerscale results: reads the cells' Parquet rows, never the workers.

The CLI calls three functions: `load_results`, `fit_results` and `write_report`; the last two take
`x=` ("params" | "neutral_loss" | "task_score"), what stands for model size N in the joint laws.
"""

import importlib

from analysis.io import LoadedResults, NoResultsError, SkippedFile, load_results

# The fitting and report names load scipy and matplotlib (~2 s): imported on first use, so that what
# reads the store alone (`steerscale status`, the driver's store via analysis.io) does not pay for them.
_LAZY = {"ReportLocationError": "analysis.report", "write_report": "analysis.report", "FitSummary": "analysis.summary", "fit_results": "analysis.summary"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = ["FitSummary", "LoadedResults", "NoResultsError", "ReportLocationError", "SkippedFile", "fit_results", "load_results", "write_report"]
