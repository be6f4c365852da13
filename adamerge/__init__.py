"""adamerge: merge fine-tuned models by training only the merge coefficients on unlabeled data."""

__version__ = "0.1.0"

from adamerge.errors import MergeInputError  # noqa: E402
from adamerge.export import load_task_model, read_manifest  # noqa: E402
from adamerge.loading import load_merged  # noqa: E402

__all__ = ["MergeInputError", "__version__", "load_merged", "load_task_model", "read_manifest"]
