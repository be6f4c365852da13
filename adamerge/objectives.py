"""Training objectives on per-task logits. One copy each; methods combine them.

Logits are ``[n, C]`` (classification) or ``[n, L, V]`` (causal LM: next-token distributions). For the latter a
``[n, L]`` mask selects the non-pad positions that count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from adamerge.functional import entropy

OBJECTIVES = ("entropy", "kl")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None or values.ndim == 1:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def entropy_objective(logits: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """AdaMerging's objective: Σ_tasks mean H(softmax(logits_t)) (over rows, or over masked tokens)."""
    per_task = {t: _masked_mean(entropy(z), None if masks is None else masks[t]) for t, z in logits.items()}
    return sum(per_task.values()), per_task


def kl_to_experts(logits: Mapping[str, Tensor], expert_logits: Mapping[str, Tensor],
                  masks: Mapping[str, Tensor] | None = None, temperature: float = 2.0
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """DAM-style distillation: Σ_t τ² · KL(softmax(z_t/τ) ‖ softmax(z_merged/τ)), z_t from task t's own expert."""
    per_task = {}
    for t, z in logits.items():
        log_q = torch.log_softmax(z.float() / temperature, dim=-1)
        log_p = torch.log_softmax(expert_logits[t].float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2
        per_task[t] = _masked_mean(kl, None if masks is None else masks[t])
    return sum(per_task.values()), per_task


def coefficient_similarity(matrix: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between the tasks' coefficient vectors (rows of ``[T, P]``)."""
    if matrix.shape[0] < 2:
        return matrix.new_zeros(())
    unit = torch.nn.functional.normalize(matrix, dim=1)
    sim = unit @ unit.T
    T = matrix.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (T * (T - 1))
