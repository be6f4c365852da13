"""Training a merge with Lightning: the unlabeled data module and the callbacks (export on fit end, label-free step
selection, learning-rate schedule, coefficient heatmaps, progress). Configs name them as ``adamerge.training.<Name>``.
"""

from adamerge.training.callbacks import (
    BackboneMode,
    CoefficientHeatmap,
    ExportOnFitEnd,
    LRSchedule,
    ManifestEntries,
    SelectionEarlyStopping,
    SelectStep,
    StepProgress,
    run_directory,
    run_entries,
)
from adamerge.training.datamodule import UnlabeledDataModule

__all__ = [
    "BackboneMode",
    "CoefficientHeatmap",
    "ExportOnFitEnd",
    "LRSchedule",
    "ManifestEntries",
    "SelectionEarlyStopping",
    "SelectStep",
    "StepProgress",
    "UnlabeledDataModule",
    "run_directory",
    "run_entries",
]
