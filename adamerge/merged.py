"""MergedModel: the base backbone run with merged weights via ``torch.func.functional_call``.

One call merges every tensor once (``θ0 + Σ_t λ_t τ_t``, one ``tensordot`` each), runs **one** backbone forward over
the concatenation of all tasks' inputs, and applies each task's frozen head to its slice. Gradients flow to the
coefficients (and masks) only; the base weights and task vectors are frozen buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.errors import MergeInputError
from adamerge.functional import merge_low_rank, merge_tensor
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool


def slice_output(output, sl: slice):
    """Slice every batch-first tensor of a ``transformers`` ModelOutput (or tuple) along dim 0."""
    if isinstance(output, Tensor):
        return output[sl]
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return tuple(slice_output(o, sl) for o in output)
    return type(output)(**{k: slice_output(v, sl) if isinstance(v, (Tensor, tuple)) else v for k, v in output.items()})


class MergedModel(nn.Module):
    """Frozen base + stacked task vectors behind coefficients; forward returns per-task logits.

    Args:
        pool: the loaded models (see :func:`adamerge.pool.load_pool`).
        coefficients: the coefficient parametrisation; its ``[T, P]`` matrix follows ``pool.param_names``.
    """

    def __init__(self, pool: TaskVectorPool, coefficients: Coefficients) -> None:
        super().__init__()
        self.pool_info = {"base": pool.base_source, "sources": pool.sources, "hashes": pool.hashes}
        self.task_names = list(pool.task_names)
        self.param_names = pool.param_names
        self.backbone = pool.backbone.requires_grad_(False)
        self.heads = nn.ModuleDict(pool.heads).requires_grad_(False)
        self.coefficients = coefficients
        self.masks: Mapping[str, Tensor] | None = None  # optional per-tensor masks, set by mask parametrisations
        self.task_type = pool.task_type
        # task vectors are frozen, non-persistent buffers: they follow .to(device) but stay out of checkpoints
        self._tv_keys: dict[str, str] = {}
        for i, (name, tv) in enumerate(pool.task_vectors.items()):
            self._tv_keys[name] = f"tv_{i}"
            self.register_buffer(f"tv_{i}", tv, persistent=False)
        self._lr_keys: dict[str, tuple[str, str]] = {}  # LoRA task vectors: name -> (B buffer, A buffer)
        for i, (name, (B, A)) in enumerate(pool.low_rank.items()):
            self._lr_keys[name] = (f"lrB_{i}", f"lrA_{i}")
            self.register_buffer(f"lrB_{i}", B, persistent=False)
            self.register_buffer(f"lrA_{i}", A, persistent=False)
        self.eval()

    @property
    def low_rank_names(self) -> list[str]:
        return list(self._lr_keys)

    def low_rank_factors(self, name: str) -> tuple[Tensor, Tensor]:
        b, a = self._lr_keys[name]
        return getattr(self, b), getattr(self, a)

    def task_vector(self, name: str) -> Tensor:
        return getattr(self, self._tv_keys[name])

    def task_vectors(self) -> dict[str, Tensor]:
        """The dense stacked task vectors (LoRA factors are in :meth:`low_rank_factors`)."""
        return {n: self.task_vector(n) for n in self._tv_keys}

    def set_task_vectors(self, task_vectors: Mapping[str, Tensor]) -> None:
        """Replace the dense stacked task vectors (e.g. after TIES/DARE pre-processing)."""
        for n in self._tv_keys:
            setattr(self, self._tv_keys[n], task_vectors[n].to(self.task_vector(n)))

    def merged_params(self, coefficients: Tensor | None = None, masks: Mapping[str, Tensor] | None = None
                      ) -> dict[str, Tensor]:
        """``{name: θ0 + Σ_t λ[t, p] (m ⊙ τ_t)}`` for every merged tensor; ``coefficients`` is ``[T, P]``."""
        lam = self.coefficients.matrix() if coefficients is None else coefficients
        masks = self.masks if masks is None else masks
        params = dict(self.backbone.named_parameters())
        out = {}
        for p, n in enumerate(self.param_names):
            if n in self._lr_keys:
                if masks is not None and n in masks:
                    raise MergeInputError(f"masks: tensor {n!r} has a low-rank (LoRA) task vector; masks need dense ones")
                out[n] = merge_low_rank(params[n], *self.low_rank_factors(n), lam[:, p])
            else:
                out[n] = merge_tensor(params[n], self.task_vector(n), lam[:, p],
                                      None if masks is None or n not in masks else masks[n])
        return out

    def features(self, inputs: Mapping[str, Tensor], coefficients: Tensor | None = None, masks=None):
        """Backbone output (a ModelOutput) of the merged model on ``inputs``."""
        return functional_call(self.backbone, self.merged_params(coefficients, masks), args=(), kwargs=dict(inputs))

    def head_logits(self, task: str, features, inputs: Mapping[str, Tensor]) -> Tensor:
        """Apply task ``task``'s frozen head to backbone ``features`` of ``inputs`` (causal LMs: their logits)."""
        if self.task_type == "causal_lm":
            return features.logits
        head = self.heads[task]
        stub = getattr(head, head.base_model_prefix)
        stub.features = features
        try:
            return head(**inputs).logits
        finally:
            stub.features = None

    def forward(self, inputs: Mapping[str, Tensor], tasks: list[str], sizes: list[int],
                coefficients: Tensor | None = None, masks=None, return_features: bool = False):
        """Per-task logits for a batch that concatenates ``sizes[i]`` rows of task ``tasks[i]``.

        Returns ``{task: logits}`` (and the backbone features if ``return_features``).
        """
        feats = self.features(inputs, coefficients, masks)
        out, start = {}, 0
        for task, n in zip(tasks, sizes):
            sl = slice(start, start + n)
            out[task] = self.head_logits(task, slice_output(feats, sl), {k: v[sl] for k, v in inputs.items()})
            start += n
        return (out, feats) if return_features else out

    def one_hot(self, task: str) -> Tensor:
        """``[T, P]`` coefficients that select fine-tune ``task`` exactly."""
        lam = torch.zeros(len(self.task_names), len(self.param_names), device=self.coefficients.weight.device)
        lam[self.task_names.index(task)] = 1.0
        return lam
