"""adamerge: merge fine-tuned models by training only the merge coefficients on unlabeled data."""

__version__ = "0.1.0"

from adamerge.errors import MergeInputError  # noqa: E402
from adamerge.io.manifest import read_manifest
from adamerge.serving import load_merged, load_task_model

__all__ = ["MergeInputError", "__version__", "load_merged", "load_task_model", "read_manifest"]
