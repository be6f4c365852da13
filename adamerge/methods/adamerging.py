"""AdaMerging (Yang et al. 2024): learn task- or layer-wise coefficients on unlabeled data.

    θ_p = θ0_p + Σ_t λ_{t,p} τ_{t,p}           (layer-wise; task-wise shares λ_t over p)
    L   = Σ_t mean_x H(softmax(head_t(f_θ(x))))  on unlabeled batches of every task, one backward per step

AdaMerging++ is the same with ``prep.ties_density`` set (TIES-processed task vectors). The objective is an argument
(:mod:`adamerge.objectives`): ``entropy`` (the paper's), ``infomax`` (entropy minus the entropy of the batch-mean
prediction: no collapse onto one class), or guidance from each task's own expert — the base plus its own task vector,
run under ``no_grad`` on the same rows: ``kl`` (DAM-style distillation, ``Σ_t τ² KL(softmax(z_t/τ) ‖ softmax(z/τ))``),
``pseudo_label`` (cross-entropy to the expert's argmax) or ``features`` (L1 to the expert's backbone features). For
causal LMs the logit objectives use the next-token distributions at every non-pad position.

``tune_heads=True`` also trains each task's classification head from its fine-tuned value (a per-task correction in
the spirit of SyMerge / Model Tinting, arXiv 2412.19098): the experts keep their original heads as teachers, and
the tuned heads are exported where the heads always are (``heads.safetensors``, ``tasks/<task>/``), so stock
``transformers`` still serves the result at no extra cost.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

from adamerge.engine.model import RECOMPUTE
from adamerge.errors import MergeInputError
from adamerge.kinds import get_kind
from adamerge.methods.base import MergeModule
from adamerge.objectives import Objective, coefficient_similarity
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool


class AdaMerging(MergeModule):
    """Coefficient training on unlabeled data (entropy by default).

    Args:
        base: pretrained model.
        models: task name → fine-tuned model.
        granularity: ``"task"`` (T coefficients) or ``"layer"`` (one per task and parameter tensor).
        init: initial coefficient value (reference: 0.3).
        clamp: clamp coefficients to [0, 1] in the merge (original code: yes; FusionBench: no).
        lr: learning rate (reference: 1e-3; the optimizer is the shared ``optimizer``, Adam by default).
        objective: the unlabeled objective: a name (``entropy``, the paper's; ``infomax``, ``kl``, ``pseudo_label``,
            ``features``) or the name with its options, ``{name: kl, temperature: 2.0}``
            (:class:`adamerge.objectives.Objective`).
        similarity_penalty: weight of the mean pairwise cosine similarity between tasks' coefficient vectors.
        task_chunks: run the tasks of a step in this many groups under one merge (same gradient, activation memory
            of one group; see :meth:`MergedModel.chunked_surrogate`). 1 = one forward over all tasks. ``auto``
            (default): one group per task on CPU, where it costs no time (docs/results.md, speed and memory), and 1
            on accelerators, where small groups leave the device idle; 1 with ``tune_heads``, and 1 for BatchNorm
            backbones trained on batch statistics (``batchnorm_statistics``), whose groups would each be normalised
            with their own statistics instead of the whole step's.
        micro_batches: also split each task's rows into this many pieces, run one at a time under the same merge
            (activation memory of one piece; the gradient is the same, each piece's term weighted by its share of
            the task's rows; BatchNorm backbones on batch statistics: each piece normalised by its own). For
            objectives that are means over rows of per-row terms — ``entropy``, ``kl``, ``pseudo_label`` without a
            confidence threshold — and kinds with per-row logits (not ``causal_lm``).
        tune_heads: also train each task's head (sequence classification; see the module docstring).
        recompute: what the backward re-runs, layer by layer, for the repeated layers (``encoder.layer.3``,
            ``model.layers.3``; :meth:`MergedModel.features`) — the same gradient for less memory: ``null`` (nothing);
            ``activations`` (each layer under an activation checkpoint: only its input is kept, for one more forward
            per step); ``merge`` (also each layer's merge inside it: no merged weights nor, with ``task_chunks``,
            their gradients are kept, for one more merge per layer and group; under FSDP2 each re-merge gathers the
            layer's shards again). Not for BatchNorm backbones (their layers' state changes between the forward and
            the backward).
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ``optimizer``,
            ...; see :class:`~adamerge.methods.base.MergeModule`).
    """

    method = "adamerging"

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        granularity: str = "layer",
        init: float = 0.3,
        clamp: bool = False,
        lr: float = 1e-3,
        objective: Objective | str = "entropy",
        similarity_penalty: float = 0.0,
        task_chunks: int | str = "auto",
        tune_heads: bool = False,
        micro_batches: int = 1,
        recompute: str | None = None,
        **shared,
    ) -> None:
        if recompute not in RECOMPUTE:
            raise MergeInputError(
                f"recompute: unknown value {recompute!r}; allowed: null, {', '.join(r for r in RECOMPUTE if r)}"
            )
        self.loss_fn = objective = Objective.of(objective)
        task_type = shared.get("task_type", "seq_cls")
        if micro_batches < 1:
            raise MergeInputError(f"micro_batches must be >= 1, got {micro_batches}")
        if micro_batches > 1:
            name = objective.name
            if not (name in ("entropy", "kl") or name == "pseudo_label" and objective.confidence == 0):
                raise MergeInputError(
                    f"micro_batches: objective {name!r}"
                    f"{' with a confidence threshold' if name == 'pseudo_label' else ''} is not "
                    "a mean of per-row terms (it needs a task's rows together); use micro_batches: 1"
                )
            if not get_kind(task_type).per_task_heads or tune_heads:
                why = "tune_heads" if tune_heads else f"task_type {task_type}, merged whole without per-task heads"
                raise MergeInputError(
                    f"micro_batches: needs per-row logits from frozen per-task heads (not {why}); use micro_batches: 1"
                )
        if task_chunks != "auto" and (isinstance(task_chunks, str) or task_chunks < 1):
            raise MergeInputError(f"task_chunks must be >= 1 or 'auto', got {task_chunks!r}")
        if tune_heads and task_chunks != "auto" and task_chunks > 1:
            raise MergeInputError(
                "tune_heads: heads are trained by the step's own backward, which task_chunks > 1 "
                "replaces by a surrogate of the merged weights; use task_chunks: 1"
            )
        if tune_heads and not get_kind(task_type).per_task_heads:
            raise MergeInputError(f"tune_heads needs per-task heads, which task_type {task_type!r} has not")
        if objective.name == "features":
            get_kind(task_type).check_features()  # before any model is loaded
        self._granularity, self._init, self._clamp = granularity, init, clamp
        # this class's own settings, read from here and not from ``hparams``: a subclass built by LightningCLI
        # (ConcreteAdaMerging) records only its own signature's arguments there
        self._recompute, self.tunes_heads, self._task_chunks = recompute, tune_heads, task_chunks
        self._micro_batches, self._similarity_penalty = micro_batches, similarity_penalty
        self._lr = lr
        super().__init__(base, models, **shared)

    def build_coefficients(self, pool: TaskVectorPool) -> Coefficients:
        return Coefficients(len(pool.task_names), len(pool.param_names), self._granularity, self._init, self._clamp)

    def post_init(self, pool: TaskVectorPool) -> None:
        if self._recompute:
            if self.has_batchnorm():
                raise MergeInputError(
                    f"recompute: {self._recompute}: base {pool.base_source!r} has BatchNorm "
                    "layers, whose training-mode state a re-run in the backward would not see as "
                    "the forward did; use recompute: null"
                )
            if not self.merged.layer_stores:
                raise MergeInputError(
                    f"recompute: {self._recompute}: no numbered layer of base "
                    f"{pool.base_source!r} owns a block of merged tensors (e.g. encoder.layer.N.*), "
                    "so there is nothing to recompute"
                )
            self.merged.recompute = self._recompute
        if self.tunes_heads:
            self.expert_heads = copy.deepcopy(self.merged.heads).requires_grad_(False)
            self.merged.heads.requires_grad_(True)

    def manifest_fields(self):
        return {
            "variant": "adamerging++" if self.prep.ties_density is not None else "adamerging",
            "hparams": {
                "init": self._init,
                "lr": self._lr,
                "objective": asdict(self.loss_fn),
                "tune_heads": self.tunes_heads,
                "similarity_penalty": self._similarity_penalty,
                "task_chunks": self.task_chunk_count(),
                "recompute": self._recompute,
                "steps": int(self.global_step) if self._trainer is not None else None,
            },
        }

    def loss_with(self, batch, **merge_kw):
        """(loss, per-task terms) of the configured objective on ``batch`` (``merge_kw``: already merged ``params``,
        or ``coefficients``/``masks`` to merge from)."""
        return self.loss_fn(self.step_outputs(batch, self.loss_fn, **merge_kw))

    def penalty(self):
        if not self._similarity_penalty:
            return 0.0
        return self._similarity_penalty * coefficient_similarity(self.merged.coefficients.matrix())

    def objective(self, batch):
        """(loss, per-task terms) of the configured objective on one step's batch."""
        loss, per_task = self.loss_with(batch)
        return loss + self.penalty(), per_task

    def task_chunk_count(self) -> int:
        """The number of task groups per step (``task_chunks``, with ``auto`` resolved on the module's device)."""
        chunks = self._task_chunks
        if chunks == "auto":  # BatchNorm on batch statistics: one group, the whole step's rows as the export sees
            chunks = (
                len(self.task_names)
                if self.device.type == "cpu" and not self.tunes_heads and not self.batchnorm.whole_step
                else 1
            )
        return chunks

    def training_step(self, batch, batch_idx):
        chunks = self.task_chunk_count()
        if chunks > 1 or self._micro_batches > 1:
            surrogate, loss, per_task = self.merged.chunked_surrogate(
                batch, self.loss_with, chunks, self._micro_batches
            )
            self.log_step(loss, per_task, batch)
            return surrogate + self.penalty()
        loss, per_task = self.objective(batch)
        self.log_step(loss, per_task, batch)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return self.build_optimizer(params, self._lr)
