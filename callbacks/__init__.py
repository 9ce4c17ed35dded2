"""Lightning callbacks: evaluation during validation, export and run summaries."""

from callbacks.checkpoint import ModelCheckpoint
from callbacks.core_metrics import CoreLMMetrics
from callbacks.disentanglement import Disentanglement
from callbacks.export import ExportSAE
from callbacks.feature_examples import FeatureExamples
from callbacks.ground_truth import GroundTruthRecovery
from callbacks.plateau import PlateauStopping
from callbacks.summary import RunSummary
from callbacks.synthetic_unlearning import SyntheticUnlearning
from callbacks.unlearning import Unlearning

__all__ = [
    "CoreLMMetrics",
    "Disentanglement",
    "ExportSAE",
    "FeatureExamples",
    "GroundTruthRecovery",
    "ModelCheckpoint",
    "PlateauStopping",
    "RunSummary",
    "SyntheticUnlearning",
    "Unlearning",
]
