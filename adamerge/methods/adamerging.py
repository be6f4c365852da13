"""AdaMerging (Yang et al. 2024): learn task- or layer-wise coefficients by minimising prediction entropy.

    θ_p = θ0_p + Σ_t λ_{t,p} τ_{t,p}           (layer-wise; task-wise shares λ_t over p)
    L   = Σ_t mean_x H(softmax(head_t(f_θ(x))))  on unlabeled batches of every task, one backward per step

AdaMerging++ is the same with ``prep.ties_density`` set (TIES-processed task vectors). ``objective="kl"`` is the
DAM-style alternative (arcee DAM): each task's expert — the base plus its own task vector, run under ``no_grad`` on
the same rows — is distilled into the merge, ``Σ_t τ² KL(softmax(z_t/τ) ‖ softmax(z/τ))``, optionally with a cosine
penalty between the tasks' coefficient vectors. For causal LMs both objectives use the next-token distributions at
every non-pad position.
"""

from __future__ import annotations

import torch

from adamerge.errors import MergeInputError
from adamerge.methods.base import MergeModule, TaskVectorPrep
from adamerge.objectives import OBJECTIVES, coefficient_similarity, entropy_objective, kl_to_experts
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool


class AdaMerging(MergeModule):
    """Entropy-minimising coefficient training.

    Args:
        base: pretrained model.
        models: task name → fine-tuned model.
        granularity: ``"task"`` (T coefficients) or ``"layer"`` (one per task and parameter tensor).
        init: initial coefficient value (reference: 0.3).
        clamp: clamp coefficients to [0, 1] in the merge (original code: yes; FusionBench: no).
        lr: Adam learning rate (reference: 1e-3).
        betas: Adam betas (reference: (0.9, 0.999)).
        prep: task-vector pre-processing; ``ties_density=0.2`` gives AdaMerging++.
        tv_dtype: task-vector storage dtype.
        trust_remote_code: allow hub model code.
        task_type: ``seq_cls`` or ``causal_lm``.
        objective: ``entropy`` (AdaMerging) or ``kl`` (DAM-style distillation from each task's expert).
        temperature: τ of the ``kl`` objective (2.0).
        similarity_penalty: weight of the mean pairwise cosine similarity between tasks' coefficient vectors.
        task_chunks: run the tasks of a step in this many groups under one merge (same gradient, activation memory
            of one group; see :meth:`MergedModel.chunked_surrogate`). 1 = one forward over all tasks (fastest).
    """

    method = "adamerging"

    def __init__(self, base: str, models: dict[str, str], granularity: str = "layer", init: float = 0.3,
                 clamp: bool = False, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 prep: TaskVectorPrep | None = None, tv_dtype: str | None = None,
                 trust_remote_code: bool = False, task_type: str = "seq_cls", objective: str = "entropy",
                 temperature: float = 2.0, similarity_penalty: float = 0.0, task_chunks: int = 1) -> None:
        if objective not in OBJECTIVES:
            raise MergeInputError(f"objective: unknown value {objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if temperature <= 0:
            raise MergeInputError(f"temperature must be > 0, got {temperature}")
        self._granularity, self._init, self._clamp = granularity, init, clamp
        super().__init__(base, models, prep=prep, tv_dtype=tv_dtype, trust_remote_code=trust_remote_code,
                         task_type=task_type)

    def build_coefficients(self, pool: TaskVectorPool) -> Coefficients:
        return Coefficients(len(pool.task_names), len(pool.param_names), self._granularity, self._init, self._clamp)

    def manifest_fields(self):
        return {"variant": "adamerging++" if self.prep.ties_density is not None else "adamerging",
                "hparams": {"init": self._init, "lr": self.hparams.lr, "betas": list(self.hparams.betas),
                            "objective": self.hparams.objective, "temperature": self.hparams.temperature,
                            "similarity_penalty": self.hparams.similarity_penalty,
                            "steps": int(self.global_step) if self._trainer is not None else None}}

    def token_masks(self, batch) -> dict[str, torch.Tensor] | None:
        """Per-task ``[n, L]`` masks of the non-pad positions (causal LMs), else None."""
        if self.merged.task_type != "causal_lm" or "attention_mask" not in batch["inputs"]:
            return None
        masks, start = {}, 0
        for task, n in zip(batch["tasks"], batch["sizes"]):
            masks[task] = batch["inputs"]["attention_mask"][start:start + n].bool()
            start += n
        return masks

    @torch.no_grad()
    def expert_logits(self, batch) -> dict[str, torch.Tensor]:
        """Each task's own expert (base + its task vector) on that task's rows."""
        out, start = {}, 0
        for task, n in zip(batch["tasks"], batch["sizes"]):
            rows = {k: v[start:start + n] for k, v in batch["inputs"].items()}
            out[task] = self.merged(rows, [task], [n], coefficients=self.merged.one_hot(task))[task]
            start += n
        return out

    def task_loss(self, logits, batch):
        """(loss, per-task terms) of the configured objective for ``logits`` of ``batch``."""
        masks = self.token_masks(batch)
        if self.hparams.objective == "kl":
            return kl_to_experts(logits, self.expert_logits(batch), masks, self.hparams.temperature)
        return entropy_objective(logits, masks)

    def penalty(self):
        if not self.hparams.similarity_penalty:
            return 0.0
        return self.hparams.similarity_penalty * coefficient_similarity(self.merged.coefficients.matrix())

    def objective(self, batch):
        """(loss, per-task terms) of the configured objective on one step's batch."""
        loss, per_task = self.task_loss(self.merged(batch["inputs"], batch["tasks"], batch["sizes"]), batch)
        return loss + self.penalty(), per_task

    def training_step(self, batch, batch_idx):
        if self.hparams.task_chunks > 1:
            surrogate, loss, per_task = self.merged.chunked_surrogate(batch, self.task_loss, self.hparams.task_chunks)
            self._log_step(loss, per_task, batch)
            return surrogate + self.penalty()
        loss, per_task = self.objective(batch)
        self._log_step(loss, per_task, batch)
        return loss

    def _log_step(self, loss, per_task, batch) -> None:
        self.log_dict({f"{self.hparams.objective}/{t}": v.detach() for t, v in per_task.items()}, batch_size=sum(batch["sizes"]))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=sum(batch["sizes"]))
