"""Lightning callbacks: evaluation during validation, export and run summaries."""

from callbacks.export import ExportSAE
from callbacks.ground_truth import GroundTruthRecovery
from callbacks.summary import RunSummary

__all__ = ["ExportSAE", "GroundTruthRecovery", "RunSummary"]
