"""MergeModule: the LightningModule every method shares — it loads the pool, merges, trains and exports by composing
small parts: the task-vector ``prep`` (:mod:`.prep`), the merged model (:class:`~adamerge.engine.model.MergedModel`),
the BatchNorm policy (:mod:`.batchnorm`), label-free scoring (:mod:`.selection`), data parallelism (:mod:`.parallel`)
and the export (:func:`adamerge.checkpoint.writer.write_merged`).

A method subclasses :class:`MergeModule`, declares its own arguments (the shared ones below are forwarded with
``**shared``: named once, here), chooses its coefficients and — if it trains — implements ``training_step``; what it
adds to the manifest (:meth:`~MergeModule.manifest_fields`), the files it exports
(:meth:`~MergeModule.extra_export_files`) and how such an export is served and described (``extension``, an
:class:`~adamerge.io.extensions.ExportExtension`) are declared by the method. Data-free methods set
``trainable = False`` and are run by ``adamerge merge``.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.func import functional_call

from adamerge.checkpoint.writer import ExportOptions, write_merged
from adamerge.core.distributed import full_tensor
from adamerge.engine.model import MergedModel
from adamerge.errors import MergeInputError
from adamerge.io.extensions import ExportExtension
from adamerge.io.hub import push_to_hub
from adamerge.methods import parallel, selection
from adamerge.methods.batchnorm import BatchNormPolicy, task_slices
from adamerge.methods.prep import TaskVectorPrep, parse_dtype
from adamerge.objectives import Objective, StepOutputs
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool, load_pool

log = logging.getLogger(__name__)

Optimizer = Callable[[Iterable], torch.optim.Optimizer]


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
            [...], templates: [...] or a set name, dataset: {...}}}`` (see :mod:`adamerge.kinds.clip`); ``seq_cls``:
            ``{pooler: true}`` makes each task's pooler part of its head (BERT-style models).
        batchnorm_statistics: BatchNorm backbones (image models): the statistics a training step normalises with —
            ``batch`` (the step's own rows, as the export with statistics re-estimated on such rows; default),
            ``task`` (each task's rows with their own, as each task's model in the export: ``task_buffers
            .safetensors``, ``tasks/<task>/``) or ``running`` (the base's, which no longer fit the merged weights).
        optimizer: the optimizer class of trained methods (default ``torch.optim.Adam``), built with the method's
            ``lr``; its other arguments (``betas``, ``weight_decay``) as ``init_args`` (a Lightning
            ``OptimizerCallable``).
    """

    trainable: bool = True
    method: str = "base"
    per_task_models_supported: bool = True  # False: the merge cannot be flattened into tasks/<task>/ checkpoints
    extension: ExportExtension | None = None  # what the method's export adds beyond weights and heads, and serves
    loss_fn: Objective | None = None  # the unlabeled objective of trained methods
    tunes_heads: bool = False  # trains each task's head too (the experts keep the original heads)
    dense_task_vectors: bool = False  # works on dense task vectors: LoRA adapters' are stored as products B A
    needs_data: bool = False  # a data-free method that chooses among candidates on unlabeled rows (use_data)
    EXPERT_NEEDS = frozenset({"expert_logits", "expert_features"})  # what :meth:`step_outputs` runs the experts for

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        prep: TaskVectorPrep | dict | None = None,
        tv_dtype: str | None = None,
        trust_remote_code: bool = False,
        task_type: str = "seq_cls",
        heads: dict | None = None,
        batchnorm_statistics: Literal["batch", "task", "running"] = "batch",
        optimizer: Optimizer = torch.optim.Adam,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.strict_loading = False  # checkpoints hold only the trainable state (see on_save_checkpoint)
        self.prep = TaskVectorPrep.of(prep)
        self.heads_options = heads
        pool = load_pool(
            base,
            models,
            tv_dtype=parse_dtype(tv_dtype, "tv_dtype"),
            trust_remote_code=trust_remote_code,
            task_type=task_type,
            heads=heads,
            dense_lora=self.prep.changes_vectors or self.prep.sparse_storage or self.dense_task_vectors,
        )
        own_vectors = pool.task_vectors
        pool.task_vectors = self.prep.apply(pool.task_vectors)
        self.base_source = base
        self.expert_heads: torch.nn.ModuleDict | None = None  # the teachers' heads when a method tunes the heads
        self._scoring = False  # label-free scoring runs: the merge as exported, running statistics
        self._sharded = False  # FSDP2 has sharded the stores (configure_model)
        self.merged = MergedModel(pool, self.build_coefficients(pool))
        if self.prep.changes_vectors and self.reads_experts():
            # each task's expert is its fine-tune itself, not base + its processed (trimmed, dropped, decorrelated)
            # task vector: the unprocessed vectors are kept for the experts (twice the task-vector memory)
            self.merged.set_expert_vectors(own_vectors)
        del own_vectors
        self.batchnorm = BatchNormPolicy(self.merged.backbone, batchnorm_statistics)
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

    def manifest_fields(self) -> dict[str, Any]:
        """Method-specific manifest entries (hyperparameters, drawn values, the extension's entry); the model card
        lists them under "Method settings"."""
        return {}

    def extra_export_files(self) -> dict[str, dict[str, Tensor]]:
        """More safetensors files to export next to the checkpoint (e.g. adapters)."""
        return {}

    def use_data(self, datamodule) -> None:
        """A data-free method with ``needs_data`` chooses here, on the data module's unlabeled rows."""

    def final_masks(self) -> dict[str, Tensor] | None:
        """Masks of the final merge (methods with stochastic masks make them deterministic here); None: the merge's
        own."""
        return None

    def reads_experts(self) -> bool:
        """Whether training reads each task's own expert (objectives guided by the experts, tuned heads)."""
        needs = self.loss_fn.needs if self.loss_fn is not None else ()
        return self.tunes_heads or bool(self.EXPERT_NEEDS & set(needs))

    @property
    def experts_are_fine_tunes(self) -> bool:
        """False where :meth:`expert_params` is base + a processed task vector: a ``prep`` changed the stored
        vectors and training reads no expert, so the fine-tunes' own vectors were not kept."""
        return not self.prep.changes_vectors or self.merged.expert_stores is not None

    # -- shared -----------------------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return self.merged.task_names

    def forward(self, inputs, tasks, sizes, **kw):
        return self.merged(inputs, tasks, sizes, **kw)

    task_slices = staticmethod(task_slices)

    def row_masks(self, batch) -> dict[str, Tensor] | None:
        """Per-task ``[n, L]`` non-pad masks (they weigh token-level terms; row-level ones ignore them)."""
        mask = self.merged.kind.token_mask(batch["inputs"])
        return None if mask is None else {t: mask[sl].bool() for t, sl in task_slices(batch)}

    @torch.no_grad()
    def expert_outputs(self, batch, features: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Each task's own expert — the base plus its task vector, with its original head — on that task's rows:
        ``(logits, features or None)``, without gradients."""
        logits, feats = {}, ({} if features else None)
        for task, sl in task_slices(batch):
            rows = {k: v[sl] for k, v in batch["inputs"].items()}
            out = self.merged.features(rows, params=self.merged.expert_params(task))
            logits[task] = self.merged.head_logits(task, out, rows, heads=self.expert_heads)
            if features:
                feats[task] = self.merged.feature_tensor(out)
        return logits, feats

    def step_outputs(
        self, batch, objective: Objective, task_params: Mapping[str, Mapping[str, Tensor]] | None = None, **merge_kw
    ) -> StepOutputs:
        """The merged model's outputs on ``batch`` (``merge_kw``: coefficients, masks or merged params;
        ``task_params``: per task, tensors that replace merged ones for its rows) and whatever else ``objective``
        reads (the experts' outputs on the same rows)."""
        with self.training_batchnorm():
            logits, feats = self.merged(
                batch["inputs"],
                batch["tasks"],
                batch["sizes"],
                return_features=True,
                per_task=self.per_task_batchnorm(),
                task_params=task_params,
                **merge_kw,
            )
        out = StepOutputs(logits, masks=self.row_masks(batch), all_sum=self.data_parallel_sum())
        if "features" in objective.needs:
            full = self.merged.feature_tensor(feats)
            out.features = {t: full[sl] for t, sl in task_slices(batch)}
        if self.EXPERT_NEEDS & set(objective.needs):
            out.expert_logits, out.expert_features = self.expert_outputs(batch, "expert_features" in objective.needs)
        return out

    def log_step(
        self, loss: Tensor, per_task: Mapping[str, Tensor], batch, name: str | None = None, **extra: float
    ) -> None:
        """Log a training step: the loss, each task's term (``<name>/<task>``, the objective's name by default) and
        ``extra`` scalars (``train/<key>``)."""
        size = sum(batch["sizes"])
        name = name or (self.loss_fn.name if self.loss_fn is not None else "loss")
        self.log_dict({f"{name}/{t}": v.detach() for t, v in per_task.items()}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        for key, value in extra.items():
            self.log(f"train/{key}", value, batch_size=size)

    # -- data parallelism (:mod:`adamerge.methods.parallel`) --------------------------------------------------------
    def data_parallel_group(self):
        return parallel.data_parallel_group(self.device_mesh)

    def data_parallel_sum(self):
        return parallel.data_parallel_sum(self.device_mesh)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard every task-vector store and the coefficients with FSDP2
        over the data-parallel mesh (:func:`adamerge.methods.parallel.shard_with_fsdp2`)."""
        if self.device_mesh is None or self._sharded:
            return
        parallel.check_shardable(self, self.method, self.prep.offload)
        parallel.shard_with_fsdp2(
            (*self.merged.stores, *(self.merged.expert_stores or ())), self.merged.coefficients, self.device_mesh
        )
        self._sharded = True

    # -- label-free scoring (:mod:`adamerge.methods.selection`) ----------------------------------------------------
    SELECTION_CRITERIA = selection.SELECTION_CRITERIA

    def selection_score(
        self, batches: list[dict], criterion: str = "agreement", expert_logits: list[dict[str, Tensor]] | None = None
    ) -> float:
        """A label-free score of the model as it would be exported now (higher is better); see
        :mod:`adamerge.methods.selection`."""
        return self.selection_scores(batches, criterion, expert_logits)[0]

    def selection_scores(
        self, batches: list[dict], criterion: str = "agreement", expert_logits: list[dict[str, Tensor]] | None = None
    ) -> tuple[float, dict[str, float] | None]:
        """:meth:`selection_score` and, for the agreement criteria, each task's fraction (``None`` for
        ``objective``)."""
        return selection.selection_scores(self, batches, criterion, expert_logits)

    @contextmanager
    def scoring(self):
        """Inside the block the merge runs as it would be exported (running BatchNorm statistics)."""
        self._scoring = True
        try:
            yield
        finally:
            self._scoring = False

    # -- BatchNorm (:mod:`adamerge.methods.batchnorm`) --------------------------------------------------------------
    @property
    def batchnorm_statistics(self) -> str:
        return self.batchnorm.statistics

    def has_batchnorm(self) -> bool:
        return self.batchnorm.present

    def per_task_batchnorm(self) -> bool:
        return self.batchnorm.per_task

    def training_batchnorm(self):
        """The BatchNorm mode of the merge's forward in a training step (the policy's; running statistics outside
        training: evaluation, selection, the experts' forwards)."""
        active = self._trainer is not None and self.trainer.training and not self._scoring
        return self.batchnorm.training(active, total=self.data_parallel_sum() if active else None)

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: list[dict]) -> None:
        """Re-estimate the backbone's BatchNorm running statistics under the final merge on ``batches``; with
        ``batchnorm_statistics: task`` each task's own too. :meth:`predict` and the export use them from then on."""
        if batches and self.has_batchnorm():
            self.batchnorm.recalibrate(self.final_merged_params(), batches, self.task_names, self.trainable)

    # -- the final merge --------------------------------------------------------------------------------------------
    def coefficient_matrix(self) -> Tensor:
        """The ``[T, P]`` coefficients (a collective when FSDP2 shards them: call it on every rank)."""
        return full_tensor(self.merged.coefficients.matrix()).detach().cpu()

    @torch.no_grad()
    def final_merged_params(self) -> dict[str, Tensor]:
        """The merged backbone tensors of the final merge, all at once (with re-estimated BatchNorm statistics when
        :meth:`recalibrate_batchnorm` ran)."""
        return {**self.merged.merged_params(masks=self.final_masks()), **self.batchnorm.stats}

    def export_params(self) -> Mapping[str, Tensor]:
        """The same tensors as :meth:`final_merged_params`, merged one block at a time as the export reads them."""
        lazy = self.merged.lazy_merged_params(masks=self.final_masks())
        return ChainMap(self.batchnorm.stats, lazy) if self.batchnorm.stats else lazy

    def task_params(self, task: str, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The backbone tensors ``task``'s rows run with: ``params``, with the task's own BatchNorm statistics."""
        return self.batchnorm.task_params(task, params)

    def predict(self, task: str, inputs, params: dict[str, Tensor] | None = None) -> Tensor:
        """Logits of ``task``'s head on ``inputs`` with backbone ``params`` (default: the final merge, with the task's
        own BatchNorm statistics where it has them)."""
        if params is None:
            params = self.task_params(task, self.final_merged_params())
        feats = functional_call(self.merged.backbone, params, args=(), kwargs=dict(inputs))
        return self.merged.head_logits(task, feats, inputs)

    # -- manifest and export ----------------------------------------------------------------------------------------
    def manifest(self, entries: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The export's manifest: sources, prep, coefficients, the method's own fields (listed in ``settings``), its
        extension, and ``entries`` handed over by the run (``selection``, ``lr_schedule``, ``data``, ``config``)."""
        c = self.merged.coefficients
        info = self.merged.pool_info
        fields = self.manifest_fields()
        return {
            "method": self.method,
            "base": {"source": info["base"], "sha256": info["hashes"]["base"]},
            "sources": [
                {"task": t, "source": info["sources"][t], "sha256": info["hashes"][t]} for t in self.task_names
            ],
            "prep": asdict(self.prep),
            "coefficients": {
                "granularity": c.granularity,
                "clamp": c.clamp,
                "tasks": self.task_names,
                "params": self.merged.param_names,
                "values": full_tensor(c.weight).detach().cpu(),
                "effective": self.coefficient_matrix(),
            },
            **fields,
            "settings": sorted(fields),
            **({"extensions": {self.extension.key: self.extension.module}} if self.extension else {}),
            **({"head_options": {"pooler": True}} if self.merged.kind.keeps_pooler(self.heads_options) else {}),
            **({"batchnorm": self.batchnorm.info} if self.batchnorm.info else {}),
            **(entries or {}),
        }

    def export(
        self,
        output_dir: str | Path,
        overwrite: bool = False,
        write: bool = True,
        entries: Mapping[str, Any] | None = None,
        **options,
    ) -> Path:
        """Write the flattened merged checkpoint (see :mod:`adamerge.checkpoint.writer`); ``options`` are
        :class:`~adamerge.checkpoint.writer.ExportOptions` (``per_task_models``, ``dtype``, ``max_shard_size``,
        ``model_card``, ``push_to_hub``, ...); ``entries``: manifest entries handed over by the run (e.g.
        ``{"config": <the run's YAML>}``, shown in the model card).

        When FSDP2 shards the model, call it on every rank (gathering is collective) with ``write`` true on one.
        """
        opts = ExportOptions(**options)
        params = self.export_params()
        if self._sharded:  # a collective per block: every rank merges now, in the same order
            params = dict(params)
        manifest = self.manifest(entries)
        if opts.push_to_hub:
            manifest["hub"] = {"repo_id": opts.push_to_hub, "revision": opts.hub_revision}
        if not write:
            return Path(output_dir)
        writer = None
        if opts.lora_adapters:
            from adamerge.checkpoint.lora_adapters import write_lora_adapters

            def writer(tmp: Path):
                return write_lora_adapters(self, tmp)

        out = write_merged(
            output_dir,
            self.merged.backbone,
            params,
            self.merged.heads,
            manifest,
            tokenizer_source=self.base_source,
            tokenizer=self.merged.tokenizer,
            kind=self.merged.kind,
            per_task_models=opts.per_task_models and self.per_task_models_supported,
            overwrite=overwrite,
            extra_files=self.extra_export_files(),
            extra_writer=writer,
            dtype=opts.dtype,
            max_shard_size=opts.max_shard_size,
            model_card=opts.model_card,
            task_tensors=self.batchnorm.task_stats,
        )
        if opts.push_to_hub:
            push_to_hub(
                out,
                opts.push_to_hub,
                private=opts.hub_private,
                revision=opts.hub_revision,
                commit_message=f"adamerge: {self.method} merge of {', '.join(self.task_names)}",
            )
        return out

    # -- training state ---------------------------------------------------------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def build_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """The configured optimizer (``optimizer``) over ``params`` at learning rate ``lr``."""
        return self.optimizer_factory(params, lr=lr)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise MergeInputError(f"method {self.method!r} has nothing to train; run it with `adamerge merge`")
        return self.build_optimizer(params, self.hparams.lr)
