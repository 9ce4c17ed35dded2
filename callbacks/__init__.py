"""Lightning callbacks: evaluation during validation, export and run summaries."""

from callbacks.core_metrics import CoreLMMetrics
from callbacks.export import ExportSAE
from callbacks.ground_truth import GroundTruthRecovery
from callbacks.summary import RunSummary
from callbacks.unlearning import Unlearning

__all__ = ["CoreLMMetrics", "ExportSAE", "GroundTruthRecovery", "RunSummary", "Unlearning"]
