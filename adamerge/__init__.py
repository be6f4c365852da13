"""adamerge: merge fine-tuned models by training only the merge coefficients on unlabeled data.

The public API is the names below, each imported from its module on first use (PEP 562), so ``import adamerge``
stays light (no torch, no Lightning) until a name is used. Code outside the package (``benchmarks/``, users'
scripts) imports only these: ``from adamerge import METHODS, UnlabeledDataModule``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module" (the same name there) or "module:name" (a name of its own here)
_PUBLIC: dict[str, str] = {
    # errors; loading and reading an export
    "MergeInputError": "adamerge.errors",
    "load_merged": "adamerge.loading",
    "load_task_model": "adamerge.export",
    "read_manifest": "adamerge.export",
    # methods: the registry, the base class, task-vector pre-processing
    "METHODS": "adamerge.methods",
    "get_method": "adamerge.methods",
    "MergeModule": "adamerge.methods",
    "TaskVectorPrep": "adamerge.methods",
    # data
    "TaskData": "adamerge.data",
    "UnlabeledDataModule": "adamerge.data",
    "input_builder": "adamerge.data",
    # training callbacks
    "SelectStep": "adamerge.callbacks",
    "LRSchedule": "adamerge.callbacks",
    "StepProgress": "adamerge.callbacks",
    # scoring
    "score": "adamerge.evaluate",
    "evaluate_checkpoint": "adamerge.evaluate",
    # command line
    "cli_main": "adamerge.cli:main",
    "quiet_libraries": "adamerge.cli",
    # label-free hyperparameter search (``adamerge sweep`` / ``adamerge pick``)
    "parse_grid": "adamerge.sweep",
    "sweep_search": "adamerge.sweep:search",
    "at_edge": "adamerge.pick",
    # coefficients as the model card tabulates them
    "coefficient_table": "adamerge.card",
    # the merge engine, for custom training loops
    "load_pool": "adamerge.pool",
    "MergedModel": "adamerge.merged",
    "Coefficients": "adamerge.parametrize",
    "entropy_objective": "adamerge.objectives",
    "ties_trim_elect": "adamerge.functional",
    "recalibrate_batchnorm": "adamerge.merged",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    target = _PUBLIC.get(name)
    if target is None:
        raise AttributeError(f"module 'adamerge' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
