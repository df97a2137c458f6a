"""Target language models: configuration, training, quality checks and loading by name."""

from decomposer.target.config import ModelShape, TargetConfig, TrainSettings, load_target_config
from decomposer.target.loading import BUNDLED, SMOLLM2, bundled_target_path, load_target
from decomposer.target.quality import Prediction, QualityReport, measure_quality, top_predictions
from decomposer.target.train import StepLog, train_target

__all__ = [
    "BUNDLED",
    "SMOLLM2",
    "ModelShape",
    "Prediction",
    "QualityReport",
    "StepLog",
    "TargetConfig",
    "TrainSettings",
    "bundled_target_path",
    "load_target",
    "load_target_config",
    "measure_quality",
    "top_predictions",
    "train_target",
]
