"""WEMoE, weight-ensembling mixture of experts (Tang et al., ICML 2024, "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts").

Every tensor outside the MLPs is merged by Task Arithmetic (``θ0 + scale Σ_t τ_t``, scale 0.3); the MLP of every
transformer block becomes the pretrained MLP plus the task vectors weighted per input by a router (a 2-layer MLP on
the block's input averaged over its non-pad tokens), see :mod:`adamerge.parametrize.routing`. Only the routers
train — on unlabeled data with any objective of :mod:`adamerge.objectives` (the paper: entropy, Adam 1e-4, 1,000
steps, batch 16). The routers start as Task Arithmetic exactly (output weights 0, bias ``init`` = ``scale``).

Export (not flattenable: the MLP weights depend on each input): the shared weights as a normal checkpoint — the
TA-merged tensors, and the *pretrained* MLPs — plus ``wemoe.safetensors`` with the routers and the routed task
vectors (T stacked copies of every MLP tensor, or their rank-``rank`` SVD factors). ``adamerge.load_merged`` serves
it; stock ``transformers`` loads the root but would run the pretrained MLPs without the routed task vectors. The
export costs T MLPs' worth of extra parameters (about T × 2/3 of a BERT-style encoder; ``rank`` cuts that to
``T·rank·(in+out)`` per MLP matrix), and serving costs T extra MLP matmuls per token (dense).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch

from adamerge.errors import MergeInputError
from adamerge.methods.base import MergeModule
from adamerge.objectives import Objective
from adamerge.parametrize import Coefficients
from adamerge.parametrize.routing import DEFAULT_MODULES, WEMOE_EXPORT, WEMOE_FILE, RoutedMLPs, routed_modules
from adamerge.pool import TaskVectorPool


class WEMoE(MergeModule):
    """Routers over the MLP task vectors, everything else Task Arithmetic (see the module docstring).

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        scale: Task Arithmetic's λ for the shared tensors (0.3 as the paper).
        init: the routers' initial weight of every task (default ``scale``: the model starts as Task Arithmetic).
        modules: regular expressions naming the routed ``nn.Linear`` modules (default: the MLP layers of BERT-like,
            LLaMA-like and CLIP/ViT encoders).
        rank: keep each routed task vector as its top-``rank`` SVD factors (memory and compute); None: dense.
        router_hidden: routers' hidden width (default: the block's input width).
        lr: learning rate of the routers (1e-4 as the paper).
        objective: the unlabeled objective: a name (``entropy``, ``infomax``, ``kl``, ``pseudo_label``,
            ``features``) or the name with its options, ``{name: kl, temperature: 2.0}``
            (:class:`adamerge.objectives.Objective`).
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ``optimizer``,
            ...; see :class:`~adamerge.methods.base.MergeModule`).
    """

    method = "wemoe"
    per_task_models_supported = False
    dense_task_vectors = True  # routes dense task vectors (LoRA adapters' stored as products B A)
    extension = WEMOE_EXPORT  # routers: exported, carded and served by adamerge.parametrize.routing

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        scale: float = 0.3,
        init: float | None = None,
        modules: Sequence[str] = DEFAULT_MODULES,
        rank: int | None = None,
        router_hidden: int | None = None,
        lr: float = 1e-4,
        objective: Objective | str = "entropy",
        **shared,
    ) -> None:
        self.loss_fn = Objective.of(objective)
        if self.loss_fn.name == "features":
            raise MergeInputError(
                "objective: 'features' is not supported by wemoe (its features depend on the "
                "routing); use entropy, infomax, kl or pseudo_label"
            )
        if rank is not None and rank < 1:
            raise MergeInputError(f"rank must be >= 1 (or null for dense task vectors), got {rank}")
        self._scale = scale
        self._init = scale if init is None else init
        self._patterns = list(modules)
        super().__init__(base, models, **shared)

    def _routed_tensors(self, pool: TaskVectorPool) -> tuple[list[str], set[str]]:
        names = routed_modules(pool.backbone, self._patterns)
        tensors = {f"{n}.{p}" for n in names for p in ("weight", "bias")} & set(pool.param_names)
        missing = [n for n in names if f"{n}.weight" not in tensors]
        if missing:
            raise MergeInputError(f"modules: routed module {missing[0]!r} has no dense task vector for its weight")
        return names, tensors

    def build_coefficients(self, pool: TaskVectorPool) -> Coefficients:
        _, routed = self._routed_tensors(pool)
        values = torch.full((len(pool.task_names), len(pool.param_names)), float(self._scale))
        for j, n in enumerate(pool.param_names):
            if n in routed:
                values[:, j] = 0.0  # the routed MLPs keep their pretrained weights; the routers add the task vectors
        c = Coefficients(len(pool.task_names), len(pool.param_names), "layer", values)
        return c.requires_grad_(False)

    def post_init(self, pool: TaskVectorPool) -> None:
        names, _ = self._routed_tensors(pool)
        if self.prep.sparse_storage:
            raise MergeInputError("wemoe routes dense task vectors: prep.sparse_storage is not supported")
        modules = dict(self.merged.backbone.named_modules())
        tvs = {
            n: (
                self.merged.task_vector(f"{n}.weight"),
                self.merged.task_vector(f"{n}.bias") if f"{n}.bias" in pool.param_names else None,
            )
            for n in names
        }
        self.routing = RoutedMLPs(
            names,
            {n: modules[n].in_features for n in names},
            tvs,
            len(pool.task_names),
            self._init,
            self.hparams.router_hidden,
            self.hparams.rank,
        )
        self.routing.attach(self.merged.backbone)

    # -- forward passes: routed for the merge, plain for the experts --------------------------------------------
    def step_outputs(self, batch, objective, **merge_kw):
        with self.routing.context(batch["inputs"]):
            return super().step_outputs(batch, objective, **merge_kw)

    def expert_outputs(self, batch, features: bool = False):
        with self.routing.disabled():
            return super().expert_outputs(batch, features)

    def predict(self, task: str, inputs, params=None):
        with self.routing.context(inputs):
            return super().predict(task, inputs, params)

    def forward(self, inputs, tasks, sizes, **kw):
        with self.routing.context(inputs):
            return super().forward(inputs, tasks, sizes, **kw)

    def training_step(self, batch, batch_idx):
        loss, per_task = self.loss_fn(self.step_outputs(batch, self.loss_fn))
        self.log_step(loss, per_task, batch)
        return loss

    # -- export -----------------------------------------------------------------------------------------------
    def extra_export_files(self):
        return {WEMOE_FILE: self.routing.tensors()}

    def manifest_fields(self):
        return {
            "hparams": {
                "scale": self._scale,
                "init": self._init,
                "lr": self.hparams.lr,
                "objective": asdict(self.loss_fn),
                "modules": self._patterns,
                "steps": int(self.global_step) if self._trainer is not None else None,
            },
            "wemoe": {"file": WEMOE_FILE, **self.routing.info()},
        }
