"""Training objectives: small named functions, one copy each; methods pick one by name (``objective: ...``).

Every objective reads a :class:`StepOutputs` — the merged model's per-task logits (and features), and, for the
objectives guided by the experts, each task's own expert on the same rows — and returns ``(loss, per-task terms)``,
the loss being the sum of the per-task terms. Logits are ``[n, C]`` (classification) or ``[n, L, V]`` (causal LM:
next-token distributions); there ``masks`` (``[n, L]``) select the non-pad positions that count.

Under data parallelism every mean is the mean over the *global* batch: ranks hold equal numbers of rows, but not of
non-pad tokens, confident rows or batch-mean predictions, so sums and counts go through ``all_sum`` (a sum over the
ranks that carries the gradient back; DDP and FSDP2 then average the ranks' equal losses' gradients into exactly the
one-process gradient). ``all_sum`` is None in one process.

=================  ================================================================================  ==============
name               per-task term                                                                      needs experts
=================  ================================================================================  ==============
``entropy``        mean_i H(p_i)  (AdaMerging; collapses when one class can win everywhere)            no
``infomax``        mean_i H(p_i) − w·H(mean_i p_i)  (SHOT's information maximisation: keeps the batch's  no
                   predictions diverse, so predicting one class everywhere is no longer a minimum)
``kl``             τ² KL(softmax(z_expert/τ) ‖ softmax(z/τ))  (arcee DAM)                              logits
``pseudo_label``   cross-entropy to the expert's argmax, rows where the expert's top probability ≥ c     logits
                   (SyMerge / Model Tinting's guidance)
``features``       L1 between the merged and the expert's backbone features (no head: any model;        features
                   Representation Surgery's loss, applied to the merge itself)
=================  ================================================================================  ==============
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adamerge.core.functional import entropy
from adamerge.errors import MergeInputError

Terms = tuple[Tensor, dict[str, Tensor]]


@dataclass
class StepOutputs:
    """What an objective may read for one step (every mapping is keyed by task)."""

    logits: Mapping[str, Tensor]
    masks: Mapping[str, Tensor] | None = None  # [n, L] non-pad positions (causal LM logits, token features)
    features: Mapping[str, Tensor] | None = None
    expert_logits: Mapping[str, Tensor] | None = None
    expert_features: Mapping[str, Tensor] | None = None
    all_sum: Callable[[Tensor], Tensor] | None = None  # sum over data-parallel ranks (training only); None: 1 process


AllSum = Callable[[Tensor], Tensor] | None


def _ratio(total: Tensor, count: Tensor, all_sum: AllSum) -> Tensor:
    """``total / count`` over the global batch (both summed over the ranks when ``all_sum`` is given)."""
    if all_sum is not None:
        total, count = all_sum(total), all_sum(count.detach())
    return total / count.clamp_min(1.0)


def _masked_mean(values: Tensor, mask: Tensor | None, all_sum: AllSum = None) -> Tensor:
    if mask is None or values.ndim == 1:
        return _ratio(values.sum(), values.new_tensor(float(values.numel())), all_sum)
    m = mask.to(values.dtype)
    return _ratio((values * m).sum(), m.sum(), all_sum)


def _mask(masks: Mapping[str, Tensor] | None, task: str) -> Tensor | None:
    return None if masks is None else masks.get(task)


def _total(per_task: dict[str, Tensor]) -> Terms:
    return sum(per_task.values()), per_task


def entropy_objective(
    logits: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None, all_sum: AllSum = None
) -> Terms:
    """AdaMerging's objective: Σ_tasks mean H(softmax(logits_t)) (over rows, or over masked tokens)."""
    return _total({t: _masked_mean(entropy(z), _mask(masks, t), all_sum) for t, z in logits.items()})


def infomax_objective(
    logits: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    diversity_weight: float = 1.0,
    all_sum: AllSum = None,
) -> Terms:
    """Information maximisation (SHOT, Liang et al. 2020): Σ_t mean_i H(p_i) − w · H(p̄), p̄ = mean_i p_i.

    The first term makes each prediction confident, the second rewards a batch whose predictions spread over the
    classes, so the collapse of plain entropy minimisation (one class everywhere: H(p̄) = 0) is penalised.
    """
    per_task = {}
    for t, z in logits.items():
        probs = torch.softmax(z.float(), dim=-1)
        mask = _mask(masks, t)
        if mask is not None and probs.ndim == 3:
            w = mask.to(probs.dtype)[..., None]
            mean_p = _ratio((probs * w).sum(dim=(0, 1)), w.sum(), all_sum)
        else:
            flat = probs.reshape(-1, probs.shape[-1])
            mean_p = _ratio(flat.sum(dim=0), flat.new_tensor(float(flat.shape[0])), all_sum)
        marginal = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        per_task[t] = _masked_mean(entropy(z), mask, all_sum) - diversity_weight * marginal
    return _total(per_task)


def kl_to_experts(
    logits: Mapping[str, Tensor],
    expert_logits: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    temperature: float = 2.0,
    all_sum: AllSum = None,
) -> Terms:
    """DAM-style distillation: Σ_t τ² · KL(softmax(z_t/τ) ‖ softmax(z_merged/τ)), z_t from task t's own expert."""
    per_task = {}
    for t, z in logits.items():
        log_q = torch.log_softmax(z.float() / temperature, dim=-1)
        log_p = torch.log_softmax(expert_logits[t].float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2
        per_task[t] = _masked_mean(kl, _mask(masks, t), all_sum)
    return _total(per_task)


def pseudo_label_objective(
    logits: Mapping[str, Tensor],
    expert_logits: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    confidence: float = 0.0,
    all_sum: AllSum = None,
) -> Terms:
    """Σ_t mean cross-entropy of the merge to task t's expert's argmax, over the rows (tokens) where the expert's top
    probability is at least ``confidence`` (0 keeps all). A task with no confident row contributes 0."""
    per_task = {}
    for t, z in logits.items():
        expert_p = torch.softmax(expert_logits[t].float(), dim=-1)
        top, target = expert_p.max(dim=-1)
        keep = top >= confidence
        m = _mask(masks, t)
        if m is not None and keep.ndim == 2:
            keep = keep & m.bool()
        ce = torch.nn.functional.cross_entropy(
            z.float().reshape(-1, z.shape[-1]), target.reshape(-1), reduction="none"
        ).reshape(target.shape)
        w = keep.to(ce.dtype)
        per_task[t] = _ratio((ce * w).sum(), w.sum(), all_sum)
    return _total(per_task)


def l1_distance(x: Tensor, target: Tensor, attention_mask: Tensor | None = None, all_sum: AllSum = None) -> Tensor:
    """Mean absolute difference; for token features ``[n, L, d]`` averaged over the non-pad tokens only."""
    diff = (x - target).abs()
    if x.ndim == 3 and attention_mask is not None:
        w = attention_mask[..., None].to(x.dtype)
        return _ratio((diff * w).sum(), w.sum() * x.shape[-1], all_sum)
    return _ratio(diff.sum(), diff.new_tensor(float(diff.numel())), all_sum)


def feature_alignment(
    features: Mapping[str, Tensor],
    expert_features: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    all_sum: AllSum = None,
) -> Terms:
    """Σ_t L1(f_merged(x), f_t(x)) on task t's rows: the merge's backbone features pulled towards each expert's."""
    return _total(
        {t: l1_distance(f.float(), expert_features[t].float(), _mask(masks, t), all_sum) for t, f in features.items()}
    )


# name -> what the objective reads besides the merged logits ("expert_logits", "features", "expert_features")
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "entropy": (),
    "infomax": (),
    "kl": ("expert_logits",),
    "pseudo_label": ("expert_logits",),
    "features": ("features", "expert_features"),
}


@dataclass
class Objective:
    """A named objective (:data:`OBJECTIVES`) with its options; calling it on a :class:`StepOutputs` gives
    ``(loss, per-task terms)``.

    Args:
        name: ``entropy``, ``infomax``, ``kl``, ``pseudo_label`` or ``features``.
        temperature: τ of ``kl``.
        diversity_weight: w of ``infomax``.
        confidence: minimum expert top probability of a row that ``pseudo_label`` learns from.
    """

    name: str = "entropy"
    temperature: float = 2.0
    diversity_weight: float = 1.0
    confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise MergeInputError(f"objective: unknown value {self.name!r}; allowed: {', '.join(OBJECTIVES)}")
        if self.temperature <= 0:
            raise MergeInputError(f"temperature must be > 0, got {self.temperature}")
        if self.diversity_weight < 0:
            raise MergeInputError(f"diversity_weight must be >= 0, got {self.diversity_weight}")
        if not 0.0 <= self.confidence < 1.0:
            raise MergeInputError(f"confidence must be in [0, 1), got {self.confidence}")

    @classmethod
    def of(cls, value: Objective | str | Mapping[str, Any]) -> Objective:
        """An objective as a method takes it: an instance, a name with the default options, or a mapping of the
        fields (as a config writes it: ``{name: kl, temperature: 2.0}``; an unknown field is refused by name)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, Mapping):
            raise MergeInputError(
                f"objective: expected a name or a mapping of {', '.join(cls.__dataclass_fields__)}, "
                f"got {type(value).__name__}"
            )
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise MergeInputError(
                f"objective: unknown field {unknown[0]!r}; allowed: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**value)

    @property
    def needs(self) -> tuple[str, ...]:
        """What the objective reads besides the merged logits."""
        return OBJECTIVES[self.name]

    def __call__(self, out: StepOutputs) -> Terms:
        if self.name == "entropy":
            return entropy_objective(out.logits, out.masks, out.all_sum)
        if self.name == "infomax":
            return infomax_objective(out.logits, out.masks, self.diversity_weight, out.all_sum)
        if self.name == "kl":
            return kl_to_experts(out.logits, out.expert_logits, out.masks, self.temperature, out.all_sum)
        if self.name == "pseudo_label":
            return pseudo_label_objective(out.logits, out.expert_logits, out.masks, self.confidence, out.all_sum)
        return feature_alignment(out.features, out.expert_features, out.masks, out.all_sum)


def coefficient_similarity(matrix: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between the tasks' coefficient vectors (rows of ``[T, P]``)."""
    if matrix.shape[0] < 2:
        return matrix.new_zeros(())
    unit = torch.nn.functional.normalize(matrix, dim=1)
    sim = unit @ unit.T
    T = matrix.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (T * (T - 1))
