"""adamerge: merge fine-tuned models by training only the merge coefficients on unlabeled data.

The public API is the names below, each imported from its module on first use (PEP 562), so ``import adamerge``
stays light (no torch, no Lightning) until a name is used. Code outside the package (``benchmarks/``, users'
scripts) imports only these: ``from adamerge import METHODS, UnlabeledDataModule``.

Inside, imports point down only, in this order (bottom first; the import-linter contract in ``pyproject.toml`` keeps
it, function-level imports included):

    errors, core        the error type; pure tensor math and small torch helpers
    io                  sources, safetensors, manifest, datasets, Hub, the export-extension registry
    kinds               one module per model kind behind ModelKind
    pool                base + fine-tunes -> stacked frozen task vectors
    objectives | parametrize    objectives; coefficients, masks, routers, adapters
    engine              MergedModel and the task-vector stores
    checkpoint          the flattened export, PEFT adapters, the model card
    methods             MergeModule and one module per method (the only LightningModules)
    training            the data module and callbacks
    pick | serving      choosing among exports; load_merged / load_task_model (no Lightning)
    evaluate            scoring exports and plain models (no Lightning)
    cli                 app (LightningCLI, merge) < sweep < main
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module" (the same name there) or "module:name" (a name of its own here)
_PUBLIC: dict[str, str] = {
    # errors; loading and reading an export
    "MergeInputError": "adamerge.errors",
    "load_merged": "adamerge.serving",
    "load_task_model": "adamerge.serving",
    "read_manifest": "adamerge.io.manifest",
    # methods: the registry, the base class, task-vector pre-processing
    "METHODS": "adamerge.methods",
    "get_method": "adamerge.methods",
    "AdaMerging": "adamerge.methods",
    "MergeModule": "adamerge.methods",
    "TaskVectorPrep": "adamerge.methods",
    "register_method": "adamerge.methods",
    "Objective": "adamerge.objectives",
    # what a method adds to an export beyond weights and heads (served by load_merged, described by the card)
    "ExportExtension": "adamerge.io.extensions",
    "register_extension": "adamerge.io.extensions",
    # data
    "TaskData": "adamerge.io.datasets",
    "UnlabeledDataModule": "adamerge.training",
    "input_builder": "adamerge.io.datasets",
    # training callbacks
    "SelectStep": "adamerge.training",
    "SelectionEarlyStopping": "adamerge.training",
    "LRSchedule": "adamerge.training",
    "StepProgress": "adamerge.training",
    "ExportOnFitEnd": "adamerge.training",
    "run_entries": "adamerge.training",
    # scoring
    "score": "adamerge.evaluate",
    "evaluate_checkpoint": "adamerge.evaluate",
    # command line
    "cli_main": "adamerge.cli.main:main",
    "quiet_libraries": "adamerge.cli.app",
    # label-free hyperparameter search (``adamerge sweep`` / ``adamerge pick``)
    "parse_grid": "adamerge.cli.sweep",
    "sweep_search": "adamerge.cli.sweep:search",
    "at_edge": "adamerge.pick",
    # coefficients as the model card tabulates them
    "coefficient_table": "adamerge.checkpoint.card",
    # the merge engine, for custom training loops
    "load_pool": "adamerge.pool",
    "MergedModel": "adamerge.engine.model",
    "Coefficients": "adamerge.parametrize",
    "entropy_objective": "adamerge.objectives",
    "ties_trim_elect": "adamerge.core.functional",
    "recalibrate_batchnorm": "adamerge.core.batchnorm",
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
