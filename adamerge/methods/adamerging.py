"""AdaMerging (Yang et al. 2024): learn task- or layer-wise coefficients by minimising prediction entropy.

    θ_p = θ0_p + Σ_t λ_{t,p} τ_{t,p}           (layer-wise; task-wise shares λ_t over p)
    L   = Σ_t mean_x H(softmax(head_t(f_θ(x))))  on unlabeled batches of every task, one backward per step

AdaMerging++ is the same with ``prep.ties_density`` set (TIES-processed task vectors).
"""

from __future__ import annotations

from adamerge.methods.base import MergeModule, TaskVectorPrep
from adamerge.objectives import entropy_objective
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
    """

    method = "adamerging"

    def __init__(self, base: str, models: dict[str, str], granularity: str = "layer", init: float = 0.3,
                 clamp: bool = False, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 prep: TaskVectorPrep | None = None, tv_dtype: str | None = None,
                 trust_remote_code: bool = False) -> None:
        self._granularity, self._init, self._clamp = granularity, init, clamp
        super().__init__(base, models, prep=prep, tv_dtype=tv_dtype, trust_remote_code=trust_remote_code)

    def build_coefficients(self, pool: TaskVectorPool) -> Coefficients:
        return Coefficients(len(pool.task_names), len(pool.param_names), self._granularity, self._init, self._clamp)

    def manifest_fields(self):
        return {"variant": "adamerging++" if self.prep.ties_density is not None else "adamerging",
                "hparams": {"init": self._init, "lr": self.hparams.lr, "betas": list(self.hparams.betas),
                            "steps": int(self.global_step) if self._trainer is not None else None}}

    def training_step(self, batch, batch_idx):
        logits = self.merged(batch["inputs"], batch["tasks"], batch["sizes"])
        loss, per_task = entropy_objective(logits)
        self.log_dict({f"entropy/{t}": v.detach() for t, v in per_task.items()}, batch_size=sum(batch["sizes"]))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=sum(batch["sizes"]))
        return loss
