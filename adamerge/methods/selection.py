"""Label-free scores of a merge as it would be exported now, on held-back unlabeled batches (higher is better).

``agreement`` — the mean over tasks of the fraction of rows (tokens) where the merge's prediction equals its own
expert's; ``worst_agreement`` — the lowest of those per-task fractions (a step where one task drifts from its expert
scores low even when the others gain); ``objective`` — minus the method's training objective. No label is read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.errors import MergeInputError
from adamerge.methods.batchnorm import task_slices

SELECTION_CRITERIA = ("agreement", "worst_agreement", "objective")


def check_criterion(criterion: str, where: str = "criterion") -> None:
    if criterion not in SELECTION_CRITERIA:
        raise MergeInputError(f"{where}: unknown value {criterion!r}; allowed: {', '.join(SELECTION_CRITERIA)}")


@torch.no_grad()
def selection_scores(
    module, batches: list[dict], criterion: str = "agreement", expert_logits: list[dict[str, Tensor]] | None = None
) -> tuple[float, dict[str, float] | None]:
    """``module``'s score by ``criterion`` on ``batches`` and, for the agreement criteria, each task's fraction
    (``expert_logits``: the experts' logits per batch, computed here if not given)."""
    check_criterion(criterion)
    params, task_params = module.batchnorm.scoring_params(module.final_merged_params(), batches, module.task_names)
    with module.scoring():
        if criterion == "objective":
            return objective_score(module, batches, params, task_params), None
        per_task = agreement(module, batches, params, expert_logits, task_params)
    values = list(per_task.values())
    return (min(values) if criterion == "worst_agreement" else sum(values) / len(values)), per_task


def objective_score(module, batches, params, task_params=None) -> float:
    """Minus the method's training objective on ``batches`` under ``params``."""
    loss_fn = module.loss_fn
    if loss_fn is None:
        raise MergeInputError(
            f"criterion 'objective': method {module.method!r} has no unlabeled objective; use criterion 'agreement'"
        )
    return -sum(
        float(loss_fn(module.step_outputs(b, loss_fn, task_params=task_params, params=params))[0]) for b in batches
    ) / len(batches)


def agreement(module, batches, params, expert_logits, task_params=None) -> dict[str, float]:
    """Per task, the fraction of rows (tokens) where the merge under ``params`` predicts what its expert does."""
    same, count = {}, {}
    for i, b in enumerate(batches):
        experts = expert_logits[i] if expert_logits is not None else module.expert_outputs(b)[0]
        masks = module.row_masks(b)
        for task, sl in task_slices(b):
            rows = {k: v[sl] for k, v in b["inputs"].items()}
            own = {**params, **task_params[task]} if task_params else params
            hit = module.predict(task, rows, own).argmax(-1) == experts[task].argmax(-1)
            if hit.ndim == 2 and masks is not None:
                hit = hit[masks[task]]
            same[task] = same.get(task, 0) + int(hit.sum())
            count[task] = count.get(task, 0) + hit.numel()
    return {t: same[t] / max(1, count[t]) for t in same}
