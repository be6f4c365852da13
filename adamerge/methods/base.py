"""MergeModule: the LightningModule every method shares (load, pre-process, merge, export).

Three layers in one direction: ``functional`` (math) → ``MergedModel`` (module) → this (Lightning).
A method subclasses :class:`MergeModule`, chooses its coefficients, and — if it trains — implements
``training_step``. Data-free methods set ``trainable = False`` and are run by ``adamerge merge``.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.func import functional_call

from adamerge.errors import MergeInputError
from adamerge.export import ExportOptions, push_to_hub, store_dtype, write_merged
from adamerge.functional import SUBSPACE_METHODS, dare, subspace_pieces, ties_trim_elect
from adamerge.merged import MergedModel, batch_statistics, batchnorm_layers, recalibrate_batchnorm
from adamerge.objectives import OBJECTIVES, Objective, StepOutputs
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool, load_pool

log = logging.getLogger(__name__)

def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's full value (collective), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _AllSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the backward sums the incoming gradients the same way, so that after DDP's
    (or FSDP2's) average over the ranks each one's share gets exactly the one-process gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllSum.apply(grad, ctx.group), None


def all_sum(tensor: Tensor, group=None) -> Tensor:
    """``tensor`` summed over the ranks of ``group`` (default: all), differentiably (see :class:`_AllSum`)."""
    import torch.distributed as dist

    return _AllSum.apply(tensor, dist.group.WORLD if group is None else group)


def parse_dtype(name: str | None, field: str) -> torch.dtype | None:
    return None if name is None else store_dtype(name, field)


@dataclass
class TaskVectorPrep:
    """Pre-processing applied to the task vectors once, before merging or training.

    Args:
        dare_rate: DARE drop rate ``p`` (0 disables DARE). Survivors are rescaled by ``1/(1-p)``.
        ties_density: TIES trim density ``k`` (fraction of each task's largest-magnitude entries kept), followed by
            sign election; ``None`` disables TIES.
        ties_scope: rank magnitudes over the whole model per task (``"global"``, as the paper) or per tensor.
        seed: seeds DARE's drop masks.
        sparse_storage: keep only the non-zero entries of the processed task vectors (position and value per entry,
            see :class:`adamerge.functional.SparseStack`): less memory below half density in float32 (a third in
            bfloat16), e.g. TIES or DARE; the same merge. Not with learned masks (Concrete); FSDP2 leaves sparse stores replicated.
        subspace: ``tsv`` (TSV-M) or ``iso_c`` (Iso-C): replace the task vectors by per-task pieces of that SVD-based
            merge (:func:`adamerge.functional.subspace_pieces`), whose sum is the method's merged update — so
            coefficients of 1 give TSV-M / Iso-C exactly, and learned coefficients (AdaMerging) start from there when
            ``init: 1.0``. Applied after DARE/TIES.
        subspace_skip: matrices whose name contains one of these take the mean of the task vectors instead of the
            SVD (the references skip token embeddings / output projections).
        offload: keep the (dense) task vectors in CPU memory, pinned where CUDA is present, while the model trains
            on the accelerator; each block's stacks are copied to the device in bounded chunks when the merge needs
            them, in the forward and again in the backward. The device then holds the base, one ≤ 16 MiB piece of
            task vectors and the activations: for T task vectors that do not fit beside the model (see docs/scaling.md).
            Not with LoRA or sparse task vectors, nor with FSDP2 (which shards them instead).
    """

    dare_rate: float = 0.0
    ties_density: float | None = None
    ties_scope: str = "global"
    seed: int = 0
    sparse_storage: bool = False
    subspace: str | None = None
    subspace_skip: tuple[str, ...] = ("word_embeddings", "embed_tokens", "wte", "lm_head", "text_projection")
    offload: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.dare_rate < 1.0:
            raise MergeInputError(f"prep.dare_rate must be in [0, 1), got {self.dare_rate}")
        if self.ties_density is not None and not 0.0 < self.ties_density <= 1.0:
            raise MergeInputError(f"prep.ties_density must be in (0, 1], got {self.ties_density}")
        if self.ties_scope not in ("global", "tensor"):
            raise MergeInputError(f"prep.ties_scope: unknown value {self.ties_scope!r}; allowed: global, tensor")
        if self.subspace is not None and self.subspace not in SUBSPACE_METHODS:
            raise MergeInputError(f"prep.subspace: unknown value {self.subspace!r}; allowed: "
                                  f"{', '.join(SUBSPACE_METHODS)}")
        self.subspace_skip = tuple(self.subspace_skip)

    @classmethod
    def of(cls, prep: TaskVectorPrep | Mapping[str, Any] | None) -> TaskVectorPrep:
        """``prep`` as given to a method: an instance, a mapping of its fields (as a config writes it; an unknown
        field is refused, naming it) or None (no pre-processing)."""
        if prep is None:
            return cls()
        if isinstance(prep, cls):
            return prep
        if not isinstance(prep, Mapping):
            raise MergeInputError(f"prep: expected a mapping of {', '.join(cls.__dataclass_fields__)} or a "
                                  f"TaskVectorPrep, got {type(prep).__name__}")
        unknown = sorted(set(prep) - set(cls.__dataclass_fields__))
        if unknown:
            raise MergeInputError(f"prep: unknown field {unknown[0]!r}; allowed: {', '.join(cls.__dataclass_fields__)}")
        return cls(**prep)

    @property
    def changes_vectors(self) -> bool:
        """Whether :meth:`apply` changes the task vectors (DARE, TIES or a subspace decomposition)."""
        return self.dare_rate > 0 or self.ties_density is not None or self.subspace is not None

    def apply(self, task_vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.dare_rate > 0:
            g = torch.Generator().manual_seed(self.seed)
            task_vectors = {n: dare(tv, self.dare_rate, g) for n, tv in task_vectors.items()}
        if self.ties_density is not None:
            task_vectors = ties_trim_elect(task_vectors, self.ties_density, self.ties_scope)
        if self.subspace is not None:
            task_vectors = subspace_pieces(task_vectors, self.subspace, self.subspace_skip)
        return task_vectors


def task_rows(batches: list[dict], task: str) -> list[dict]:
    """The rows of ``task`` in each step-shaped batch that has any, as batches of that task alone."""
    return [{"inputs": {k: v[sl] for k, v in b["inputs"].items()}, "tasks": [t], "sizes": [sl.stop - sl.start]}
            for b in batches for t, sl in MergeModule.task_slices(b) if t == task and sl.stop > sl.start]


class MergeModule(pl.LightningModule):
    """Base of every merge method.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model started from ``base`` (or a PEFT LoRA adapter of it).
        prep: task-vector pre-processing (DARE, TIES, subspaces): a :class:`TaskVectorPrep` or, from Python, a dict
            of its fields (``{"ties_density": 0.2}``, as a config writes it).
        tv_dtype: storage dtype of the stacked task vectors (``float32``, ``bfloat16``, ``float16``); ``None`` keeps
            the model dtype.
        trust_remote_code: allow model code from the hub (off by default).
        task_type: the model kind (:mod:`adamerge.kinds`): ``seq_cls`` (per-task classification heads), ``causal_lm``
            (whole LM merged), ``seq2seq_lm`` (whole encoder-decoder merged, first output token's logits),
            ``image_cls`` (``AutoModelForImageClassification``), ``clip`` (CLIP/SigLIP vision tower with zero-shot
            heads).
        heads: per-task head options of kinds that build heads from the base — ``clip``: ``{task: {classnames:
            [...], templates: [...] or a set name, dataset: {...}}}`` (see :mod:`adamerge.kinds.clip`).
    """

    trainable: bool = True
    method: str = "base"
    per_task_models_supported: bool = True  # False: the merge cannot be flattened into tasks/<task>/ checkpoints
    # BatchNorm: "batch" / "task" / "running", see training_batchnorm and recalibrate_batchnorm
    batchnorm_statistics: str = "batch"

    def __init__(self, base: str, models: dict[str, str], prep: TaskVectorPrep | None = None,
                 tv_dtype: str | None = None, trust_remote_code: bool = False,
                 task_type: str = "seq_cls", heads: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold only the trainable state (see on_save_checkpoint)
        self.prep = TaskVectorPrep.of(prep)
        pool = load_pool(base, models, tv_dtype=parse_dtype(tv_dtype, "tv_dtype"),
                         trust_remote_code=trust_remote_code, task_type=task_type, heads=heads)
        if pool.low_rank and (self.prep.dare_rate > 0 or self.prep.ties_density is not None
                              or self.prep.sparse_storage or self.prep.subspace is not None):
            raise MergeInputError("prep: DARE/TIES/subspace/sparse_storage need dense task vectors; the LoRA "
                                  f"adapters' tensors {next(iter(pool.low_rank))!r}, ... are low-rank (merge full "
                                  "fine-tunes instead)")
        own_vectors = pool.task_vectors
        pool.task_vectors = self.prep.apply(pool.task_vectors)
        self.pool_task_names = pool.task_names
        self.expert_heads: torch.nn.ModuleDict | None = None  # the teachers' heads when a method tunes the heads
        self.bn_stats: dict[str, Tensor] = {}  # re-estimated BatchNorm buffers of the merge (recalibrate_batchnorm)
        self.bn_task_stats: dict[str, dict[str, Tensor]] = {}  # the same per task (batchnorm_statistics "task")
        self.bn_info: dict[str, Any] | None = None
        self._scoring = False  # selection_score runs: the merge as exported, running statistics
        self.merged = MergedModel(pool, self.build_coefficients(pool))
        if self.prep.changes_vectors and self.reads_experts():
            # each task's expert is its fine-tune itself, not base + its processed (trimmed, dropped, decorrelated)
            # task vector: the unprocessed vectors are kept for the experts (twice the task-vector memory)
            self.merged.set_expert_vectors(own_vectors)
        del own_vectors
        self._has_batchnorm = bool(batchnorm_layers(self.merged.backbone))
        self.post_init(pool)
        if self.prep.sparse_storage:
            self.merged.to_sparse_storage()
        if self.prep.offload:
            self.merged.offload_task_vectors()

    # -- hooks for subclasses ---------------------------------------------------------------------------------------
    def build_coefficients(self, pool: TaskVectorPool) -> Coefficients:
        """Default: fixed task-wise coefficients of 1 (override)."""
        c = Coefficients(len(pool.task_names), len(pool.param_names), "task", 1.0)
        c.requires_grad_(False)
        return c

    def post_init(self, pool: TaskVectorPool) -> None:
        """Called once the merged model exists (e.g. to rescale task vectors)."""

    EXPERT_NEEDS = frozenset({"expert_logits", "expert_features"})  # what :meth:`step_outputs` runs the experts for

    def reads_experts(self) -> bool:
        """Whether training reads each task's own expert (objectives guided by the experts, tuned heads)."""
        objective = self.hparams.get("objective")
        needs = OBJECTIVES.get(objective, ()) if isinstance(objective, str) else ()
        return bool(self.hparams.get("tune_heads")) or bool(self.EXPERT_NEEDS & set(needs))

    @property
    def experts_are_fine_tunes(self) -> bool:
        """False where :meth:`expert_params` is base + a processed task vector: a ``prep`` changed the stored
        vectors and training reads no expert, so the fine-tunes' own vectors were not kept."""
        return not self.prep.changes_vectors or self.merged.expert_stores is not None

    def manifest_fields(self) -> dict[str, Any]:
        """Method-specific manifest entries (hyperparameters, drawn values)."""
        return {}

    # -- shared -----------------------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return self.merged.task_names

    def forward(self, inputs, tasks, sizes, **kw):
        return self.merged(inputs, tasks, sizes, **kw)

    # -- objectives (shared by every trained method) ---------------------------------------------------------------
    @staticmethod
    def task_slices(batch) -> list[tuple[str, slice]]:
        """``(task, rows)`` of every task in a step's batch (rows are contiguous per task)."""
        out, start = [], 0
        for task, n in zip(batch["tasks"], batch["sizes"]):
            out.append((task, slice(start, start + n)))
            start += n
        return out

    def row_masks(self, batch) -> dict[str, Tensor] | None:
        """Per-task ``[n, L]`` non-pad masks (they weigh token-level terms; row-level ones ignore them)."""
        mask = self.merged.kind.token_mask(batch["inputs"])
        return None if mask is None else {t: mask[sl].bool() for t, sl in self.task_slices(batch)}

    @torch.no_grad()
    def expert_outputs(self, batch, features: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Each task's own expert — the base plus its task vector, with its original head — on that task's rows:
        ``(logits, features or None)``, without gradients."""
        logits, feats = {}, ({} if features else None)
        for task, sl in self.task_slices(batch):
            rows = {k: v[sl] for k, v in batch["inputs"].items()}
            out = self.merged.features(rows, params=self.merged.expert_params(task))
            logits[task] = self.merged.head_logits(task, out, rows, heads=self.expert_heads)
            if features:
                feats[task] = self.merged.feature_tensor(out)
        return logits, feats

    def step_outputs(self, batch, objective: Objective, task_params: Mapping[str, Mapping[str, Tensor]] | None = None,
                     **merge_kw) -> StepOutputs:
        """The merged model's outputs on ``batch`` (``merge_kw``: coefficients, masks or merged params;
        ``task_params``: per task, tensors that replace merged ones for its rows) and whatever else ``objective``
        reads (the experts' outputs on the same rows)."""
        with self.training_batchnorm():
            logits, feats = self.merged(batch["inputs"], batch["tasks"], batch["sizes"], return_features=True,
                                        per_task=self.per_task_batchnorm(), task_params=task_params, **merge_kw)
        out = StepOutputs(logits, masks=self.row_masks(batch), all_sum=self.data_parallel_sum())
        if "features" in objective.needs:
            full = self.merged.feature_tensor(feats)
            out.features = {t: full[sl] for t, sl in self.task_slices(batch)}
        if self.EXPERT_NEEDS & set(objective.needs):
            out.expert_logits, out.expert_features = self.expert_outputs(batch, "expert_features" in objective.needs)
        return out

    def data_parallel_group(self):
        """The process group of the data-parallel ranks while a gradient is taken; None in one process, and where no
        gradient is taken (evaluation and label-free selection need not run on every rank)."""
        import torch.distributed as dist

        if not torch.is_grad_enabled() or not (dist.is_available() and dist.is_initialized()):
            return None
        mesh = self.data_parallel_mesh()
        group = dist.group.WORLD if mesh is None else mesh.get_group()
        return None if dist.get_world_size(group) == 1 else group

    def data_parallel_sum(self):
        """A sum over the data-parallel ranks that carries the gradient, for objectives' means over the global batch
        (see :mod:`adamerge.objectives`); None where :meth:`data_parallel_group` is."""
        group = self.data_parallel_group()
        return None if group is None else (lambda x: all_sum(x, group))

    def data_parallel_mesh(self):
        """The data-parallel dimension of the device mesh ``ModelParallelStrategy`` sets (the whole mesh when it has
        no named one); None under other strategies."""
        mesh = self.device_mesh
        if mesh is None:
            return None
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

    SELECTION_CRITERIA = ("agreement", "worst_agreement", "objective")

    @torch.no_grad()
    def selection_score(self, batches: list[dict], criterion: str = "agreement",
                        expert_logits: list[dict[str, Tensor]] | None = None) -> float:
        """A label-free score of the model as it would be exported now (higher is better), on unlabeled batches:
        ``agreement`` — the mean over tasks of the fraction of rows (tokens) where the merge's prediction equals its
        own expert's (``expert_logits``: the experts' logits per batch, computed here if not given);
        ``worst_agreement`` — the lowest of those per-task fractions (a step where one task drifts from its expert
        scores low even when the others gain); ``objective`` — minus the method's training objective."""
        return self.selection_scores(batches, criterion, expert_logits)[0]

    @torch.no_grad()
    def selection_scores(self, batches: list[dict], criterion: str = "agreement",
                         expert_logits: list[dict[str, Tensor]] | None = None) -> tuple[float, dict[str, float] | None]:
        """:meth:`selection_score` and, for the agreement criteria, each task's fraction (``None`` for
        ``objective``)."""
        if criterion not in self.SELECTION_CRITERIA:
            raise MergeInputError(f"criterion: unknown value {criterion!r}; allowed: {', '.join(self.SELECTION_CRITERIA)}")
        params, task_params = self.final_merged_params(), None
        if self.per_task_batchnorm():  # scored as it would be exported: each task's statistics under this merge
            task_params = self._task_buffers(params, batches)
        elif self.has_batchnorm():  # the same, one set of statistics for every task
            params = {**params, **self._reestimated_buffers(params, batches)}
        self._scoring = True
        try:
            if criterion == "objective":
                return self._objective_score(batches, params, task_params), None
            per_task = self._agreement(batches, params, expert_logits, task_params)
        finally:
            self._scoring = False
        values = list(per_task.values())
        return (min(values) if criterion == "worst_agreement" else sum(values) / len(values)), per_task

    def _objective_score(self, batches, params, task_params=None) -> float:
        loss_fn = getattr(self, "loss_fn", None)
        if loss_fn is None:
            raise MergeInputError(f"criterion 'objective': method {self.method!r} has no unlabeled objective; "
                                  "use criterion 'agreement'")
        return -sum(float(loss_fn(self.step_outputs(b, loss_fn, task_params=task_params, params=params))[0])
                    for b in batches) / len(batches)

    def _agreement(self, batches, params, expert_logits, task_params=None) -> dict[str, float]:
        """Per task, the fraction of rows (tokens) where the merge under ``params`` predicts what its expert does."""
        same, count = {}, {}
        for i, b in enumerate(batches):
            experts = expert_logits[i] if expert_logits is not None else self.expert_outputs(b)[0]
            masks = self.row_masks(b)
            for task, sl in self.task_slices(b):
                rows = {k: v[sl] for k, v in b["inputs"].items()}
                own = {**params, **task_params[task]} if task_params else params
                hit = self.predict(task, rows, own).argmax(-1) == experts[task].argmax(-1)
                if hit.ndim == 2 and masks is not None:
                    hit = hit[masks[task]]
                same[task] = same.get(task, 0) + int(hit.sum())
                count[task] = count.get(task, 0) + hit.numel()
        return {t: same[t] / max(1, count[t]) for t in same}

    def coefficient_matrix(self) -> Tensor:
        """The ``[T, P]`` coefficients (a collective when FSDP2 shards them: call it on every rank)."""
        return full_tensor(self.merged.coefficients.matrix()).detach().cpu()

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard every task-vector store and the coefficients with FSDP2
        (``fully_shard``) over the data-parallel mesh: each rank holds 1/N of the task vectors, gathered one block at
        a time for the merge and again for the backward; coefficient gradients are averaged by FSDP2."""
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        if self.prep.offload:
            raise MergeInputError("prep.offload streams task vectors from CPU memory; ModelParallelStrategy (FSDP2) "
                                  "shards them across devices instead: use one or the other")
        others = sorted(n for n, p in self.named_parameters() if p.requires_grad
                        and not n.startswith("merged.coefficients."))
        if others:
            raise MergeInputError(f"ModelParallelStrategy shards task vectors and coefficients only; method "
                                  f"{self.method!r} also trains {others[:3]}: use the DDP strategy")
        from torch.distributed.tensor import Shard

        dp = self.data_parallel_mesh()
        n = dp.size()

        def largest_dim(p: Tensor) -> Shard:
            """Shard the largest axis that splits evenly (FSDP2 needs that off dim 0) rather than the short task
            axis, whose shards would be uneven; dim 0 otherwise."""
            even = [d for d in range(1, p.ndim) if p.shape[d] % n == 0]
            return Shard(max(even, key=lambda d: p.shape[d]) if even else 0)

        for store in (*self.merged.stores, *(self.merged.expert_stores or ())):
            if not store.sparse_keys:  # sparse entries (uneven, integer positions) stay replicated
                fully_shard(store, mesh=dp, shard_placement_fn=largest_dim)
        fully_shard(self.merged.coefficients, mesh=dp)
        self._sharded = True

    def manifest(self) -> dict[str, Any]:
        c = self.merged.coefficients
        info = self.merged.pool_info
        return {
            "method": self.method,
            "base": {"source": info["base"], "sha256": info["hashes"]["base"]},
            "sources": [{"task": t, "source": info["sources"][t], "sha256": info["hashes"][t]}
                        for t in self.task_names],
            "prep": asdict(self.prep),
            "coefficients": {"granularity": c.granularity, "clamp": c.clamp, "tasks": self.task_names,
                             "params": self.merged.param_names,
                             "values": full_tensor(c.weight).detach().cpu(), "effective": self.coefficient_matrix()},
            **self.manifest_fields(),
            **({"head_options": {"pooler": True}} if self.merged.kind.keeps_pooler(self.hparams.get("heads")) else {}),
            **({"selection": self.selection} if getattr(self, "selection", None) else {}),
            **({"lr_schedule": self.lr_schedule} if getattr(self, "lr_schedule", None) else {}),
            **({"data": self.data_info} if getattr(self, "data_info", None) else {}),
            **({"batchnorm": self.bn_info} if self.bn_info else {}),
        }

    def final_masks(self) -> dict[str, Tensor] | None:
        """Masks of the final merge (methods with stochastic masks make them deterministic here); None: the merge's
        own."""
        return None

    @torch.no_grad()
    def final_merged_params(self) -> dict[str, Tensor]:
        """The merged backbone tensors of the final merge, all at once (with re-estimated BatchNorm statistics when
        :meth:`recalibrate_batchnorm` ran)."""
        return {**self.merged.merged_params(masks=self.final_masks()), **self.bn_stats}

    def export_params(self) -> Mapping[str, Tensor]:
        """The same tensors as :meth:`final_merged_params`, merged one block at a time as the export reads them."""
        lazy = self.merged.lazy_merged_params(masks=self.final_masks())
        return ChainMap(self.bn_stats, lazy) if self.bn_stats else lazy

    def has_batchnorm(self) -> bool:
        return self._has_batchnorm

    def per_task_batchnorm(self) -> bool:
        """Whether each task gets BatchNorm statistics of its own (``batchnorm_statistics = "task"``, a backbone with
        BatchNorm layers)."""
        return self.batchnorm_statistics == "task" and self.has_batchnorm()

    def training_batchnorm(self):
        """The BatchNorm mode of the merge's forward in a training step: with ``batchnorm_statistics = "batch"``
        (the default) every BatchNorm layer normalises with the step's own batch statistics, as the exported merge
        will with statistics re-estimated on the same kind of rows (:meth:`recalibrate_batchnorm`); with ``"task"``
        each task's rows are normalised with their own batch statistics (the backbone runs once per task under the
        one merge), as each task's model in the export will with statistics re-estimated on that task's rows; with
        ``"running"`` it keeps the base's running statistics, which no longer fit the merged weights. Under data
        parallelism the batch statistics are those of every rank's rows together (a differentiable sum over the
        ranks per layer), so N processes train as one does. Outside training (evaluation, selection, the experts'
        forwards) the running statistics are used."""
        if (self.batchnorm_statistics in ("batch", "task") and self._trainer is not None and self.trainer.training
                and not self._scoring and self.has_batchnorm()):
            return batch_statistics(self.merged.backbone, total=self.data_parallel_sum())
        return nullcontext()

    def _reestimated_buffers(self, params: Mapping[str, Tensor], batches: list[dict]) -> dict[str, Tensor]:
        """BatchNorm running statistics re-estimated under the merged weights ``params`` (their buffers ignored:
        the statistics start afresh) on the inputs of ``batches``."""
        device = next(self.merged.backbone.parameters()).device
        buffers = set(dict(self.merged.backbone.named_buffers()))
        weights = {n: t for n, t in params.items() if n not in buffers}
        inputs = [{k: v.to(device) for k, v in b["inputs"].items()} for b in batches]
        return recalibrate_batchnorm(self.merged.backbone, weights, inputs)

    def _task_buffers(self, params: Mapping[str, Tensor], batches: list[dict]) -> dict[str, dict[str, Tensor]]:
        """Per task, BatchNorm statistics re-estimated under ``params`` on that task's rows of ``batches`` alone."""
        out = {}
        for task in self.task_names:
            rows = task_rows(batches, task)
            if not rows:
                raise MergeInputError(f"batchnorm_statistics 'task': the data has no rows of task {task!r} to "
                                      "re-estimate its BatchNorm statistics on")
            out[task] = self._reestimated_buffers(params, rows)
        return out

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: list[dict]) -> None:
        """Re-estimate the backbone's BatchNorm running statistics under the final merge on ``batches`` (step-shaped
        batches of unlabeled rows): the merged weights change every layer's input statistics, which the base's
        buffers no longer describe. Used by :meth:`predict` and the export from then on.

        With ``batchnorm_statistics = "task"`` each task also gets statistics of its own, re-estimated on its rows
        alone (:attr:`bn_task_stats`): :meth:`predict` uses them for that task, and the export writes them into
        ``task_buffers.safetensors`` and each ``tasks/<task>/`` checkpoint; the root keeps the statistics of all the
        rows, a single model for every task."""
        if not batches or not self.has_batchnorm():
            return
        merged = self.final_merged_params()
        self.bn_stats = self._reestimated_buffers(merged, batches)
        self.bn_task_stats = self._task_buffers(merged, batches) if self.per_task_batchnorm() else {}
        self.bn_info = {"recalibrated": True, "batches": len(batches), "per_task": bool(self.bn_task_stats),
                        "rows": sum(int(sum(b["sizes"])) for b in batches), "layers": len(self.bn_stats) // 3,
                        **({"training_statistics": self.batchnorm_statistics} if self.trainable else {})}

    def extra_export_files(self) -> dict[str, dict[str, Tensor]]:
        """More safetensors files to export next to the checkpoint (e.g. adapters)."""
        return {}

    def task_params(self, task: str, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The backbone tensors ``task``'s rows run with: ``params`` (the merge), with the task's own BatchNorm
        statistics in place of the shared ones where it has them (:attr:`bn_task_stats`)."""
        own = self.bn_task_stats.get(task)
        if not own:
            return params
        device = next(iter(params.values())).device
        return {**params, **{n: v.to(device) for n, v in own.items()}}

    def predict(self, task: str, inputs, params: dict[str, Tensor] | None = None) -> Tensor:
        """Logits of ``task``'s head on ``inputs`` with backbone ``params`` (default: the final merge, with the task's
        own BatchNorm statistics where it has them)."""
        if params is None:
            params = self.task_params(task, self.final_merged_params())
        feats = functional_call(self.merged.backbone, params, args=(), kwargs=dict(inputs))
        return self.merged.head_logits(task, feats, inputs)

    def export(self, output_dir: str | Path, overwrite: bool = False, write: bool = True, run_config: str | None = None,
               **options) -> Path:
        """Write the flattened merged checkpoint (see :mod:`adamerge.export`); ``options`` are
        :class:`~adamerge.export.ExportOptions` (``per_task_models``, ``dtype``, ``max_shard_size``, ``model_card``,
        ``push_to_hub``, ...); ``run_config`` (the YAML of the run) goes into the manifest and the model card.

        When FSDP2 shards the model, call it on every rank (gathering is collective) with ``write`` true on one.
        """
        opts = ExportOptions(**options)
        params = self.export_params()
        if getattr(self, "_sharded", False):  # a collective per block: every rank merges now, in the same order
            params = dict(params)
        manifest = self.manifest()
        if run_config:
            manifest["config"] = run_config
        if opts.push_to_hub:
            manifest["hub"] = {"repo_id": opts.push_to_hub, "revision": opts.hub_revision}
        if not write:
            return Path(output_dir)
        writer = None
        if opts.lora_adapters:
            from adamerge.lora import write_lora_adapters

            def writer(tmp: Path):
                return write_lora_adapters(self, tmp)

        out = write_merged(output_dir, self.merged.backbone, params, self.merged.heads,
                           manifest, tokenizer_source=self.hparams.base, tokenizer=self.merged.tokenizer,
                           kind=self.merged.kind,
                           per_task_models=opts.per_task_models and self.per_task_models_supported,
                           overwrite=overwrite, extra_files=self.extra_export_files(), extra_writer=writer,
                           dtype=opts.dtype, max_shard_size=opts.max_shard_size, model_card=opts.model_card,
                           task_tensors=self.bn_task_stats)
        if opts.push_to_hub:
            push_to_hub(out, opts.push_to_hub, private=opts.hub_private, revision=opts.hub_revision,
                        commit_message=f"adamerge: {self.method} merge of {', '.join(self.task_names)}")
        return out

    def trainable_state_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise MergeInputError(f"method {self.method!r} has nothing to train; run it with `adamerge merge`")
        return torch.optim.Adam(params, lr=self.hparams.get("lr", 1e-3), betas=tuple(self.hparams.get("betas", (0.9, 0.999))))
