"""Scaling-law analysis of steerscale results: reads the cells' Parquet rows, never the workers.

The CLI calls three functions: `load_results`, `fit_results` and `write_report`; the last two take
`x=` ("params" | "neutral_loss" | "task_score"), what stands for model size N in the joint laws.
"""

from analysis.io import LoadedResults, NoResultsError, SkippedFile, load_results
from analysis.report import ReportLocationError, write_report
from analysis.summary import FitSummary, fit_results

__all__ = ["FitSummary", "LoadedResults", "NoResultsError", "ReportLocationError", "SkippedFile", "fit_results", "load_results", "write_report"]
