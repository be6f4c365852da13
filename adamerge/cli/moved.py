"""Configs in the shape of adamerge 0.1's first releases: each setting that moved is refused in one line that says
where it lives now (before jsonargparse would answer with its usage and a union dump)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adamerge.errors import MergeInputError

CONCRETE = ("ConcreteTaskArithmetic", "ConcreteAdaMerging")
OBJECTIVE_OPTIONS = ("temperature", "diversity_weight", "confidence")
PREP_OF = {
    "Ties": {"density": "ties_density", "dare_rate": "dare_rate", "seed": "seed"},
    "M3": {"ties_density": "ties_density", "dare_rate": "dare_rate"},
}


def moved_model_key(method: str, key: str) -> str | None:
    """Where ``model.init_args.<key>`` of ``method`` (a class name) lives now, or None if it did not move."""
    if key == "temperature" and method in CONCRETE:
        return (
            "model.init_args.mask_temperature (the Concrete mask's temperature; the KL objective's is "
            "model.init_args.objective: {name: kl, temperature: ...})"
        )
    if key in OBJECTIVE_OPTIONS:
        return f"model.init_args.objective: {{name: <objective>, {key}: ...}} (the objective's options)"
    if key == "betas":
        return (
            "model.init_args.optimizer: {class_path: torch.optim.Adam, init_args: {betas: [...]}} (the optimizer's "
            "own arguments)"
        )
    renamed = PREP_OF.get(method, {}).get(key)
    if renamed:
        return f"model.init_args.prep: {{{renamed}: ...}} (every method takes the same prep)"
    return None


def check_moved(config: Mapping[str, Any], where: str) -> None:
    """Refuse the first setting of ``config`` (a parsed fit or merge config file; ``where``: its path) that moved."""
    if not isinstance(config, Mapping):
        return
    if "batchnorm_statistics" in config:
        raise MergeInputError(f"{where}: batchnorm_statistics moved to model.init_args.batchnorm_statistics")
    model = config.get("model")
    if isinstance(model, Mapping):
        method = str(model.get("class_path", "")).rsplit(".", 1)[-1]
        for key in model.get("init_args") or {}:
            target = moved_model_key(method, key)
            if target:
                raise MergeInputError(f"{where}: model.init_args.{key} moved to {target}")
    callbacks = (config.get("trainer") or {}).get("callbacks") if isinstance(config.get("trainer"), Mapping) else None
    for cb in callbacks or []:
        path = str(cb.get("class_path", "")) if isinstance(cb, Mapping) else ""
        if path.startswith("adamerge.callbacks."):
            raise MergeInputError(f"{where}: {path} moved to adamerge.training.{path.rsplit('.', 1)[1]}")
