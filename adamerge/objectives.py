"""Training objectives on per-task logits. One copy each; methods combine them."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from adamerge.functional import entropy


def entropy_objective(logits: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """AdaMerging's objective: Σ_tasks mean_rows H(softmax(logits_t)). Returns (total, per-task means)."""
    per_task = {t: entropy(z).mean() for t, z in logits.items()}
    return sum(per_task.values()), per_task
