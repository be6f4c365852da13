"""Concrete subspace merging (Tang et al. 2023): learn a shared task-vector mask on an unlabeled objective.

The objective is entropy by default (the paper's) and any of :mod:`adamerge.objectives` by argument (``objective``,
``diversity_weight``, ``confidence``; the ``kl`` temperature is 2 here, as ``temperature`` is the Concrete one).

*Concrete Task Arithmetic*: λ fixed (0.3), train the mask logits (Adam 1e-3). With ``coefficients: task`` or
``layer`` (ours, not in the paper) λ is trained too, from ``scale``, jointly with the mask by the same optimizer: the
mask is rescaled by its mean per tensor, so it can only redistribute a tensor's update; the coefficients give each
task and tensor its own size. Both fold into one merged model at export, at no extra serving cost. With ``mask:
task`` (ours) each task has its own mask (T times the logits): where two tasks' updates conflict on an entry, one can
be kept and the other dropped; the export is still one merged model, ``θ0 + Σ_t λ_t m_t ⊙ τ_t``.

*Concrete AdaMerging*: first-order meta-learning for ``meta_steps`` steps — each step resets λ to its init, takes one
inner SGD step on λ (lr ``inner_lr``) with the entropy of half of every task's rows (alternate rows: the split is the
same in one process and under DDP), then the entropy of the other half at the updated λ trains the mask logits (λ's
update treated as a constant: first order; under DDP every rank takes the same inner step, on the global gradient).
Then a hard mask is drawn and frozen, and ordinary AdaMerging trains λ for the remaining steps (``trainer.max_steps``
− ``meta_steps``).
"""

from __future__ import annotations

import torch

from adamerge.core.distributed import all_sum
from adamerge.errors import MergeInputError
from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.base import MergeModule, parse_dtype
from adamerge.objectives import Objective
from adamerge.parametrize import Coefficients, ConcreteMask
from adamerge.parametrize.coefficients import GRANULARITIES


class _ConcreteMixin:
    """Mask construction, hard-mask export and manifest fields shared by both Concrete methods."""

    MASK_SHARING = ("shared", "task")

    @classmethod
    def _check_sharing(cls, mask: str) -> None:
        if mask not in cls.MASK_SHARING:
            raise MergeInputError(
                f"mask: unknown value {mask!r}; allowed: shared (one mask for every task, the "
                "paper), task (one mask per task, ours)"
            )

    def _build_mask(self, temperature, include, mask_dtype, sharing: str = "shared") -> None:
        if self.prep.sparse_storage:
            raise MergeInputError(
                "prep.sparse_storage: Concrete masks are learned over every entry of the task "
                "vectors and need them dense; leave sparse_storage false"
            )
        shapes = {n: tv.shape[1:] for n, tv in self.merged.task_vectors().items()}
        tasks = len(self.task_names) if sharing == "task" else 0
        self.mask = ConcreteMask(shapes, temperature, 0.0, include, parse_dtype(mask_dtype, "mask_dtype"), tasks)

    def _mask_gen(self, draw: int = 0) -> torch.Generator:
        """The relaxed-sample generator of this step: a function of (seed, step), so resumed runs repeat exactly."""
        return self.mask.generator(self._mask_seed * 1_000_003 + 2 * int(self.global_step) + draw)

    def hard_mask(self):
        return self.mask.hard(self._export_mask, self._mask_seed)

    def final_masks(self):
        return self.hard_mask()

    def mask_manifest(self):
        hard = self.mask.hard(self._export_mask, self._mask_seed)
        kept = sum(int((m > 0).sum()) for m in hard.values()) / sum(m.numel() for m in hard.values())
        return {
            "mask": {
                "sharing": "task" if self.mask.tasks else "shared",
                "export": self._export_mask,
                "seed": self._mask_seed,
                "temperature": self.mask.temperature,
                "masked_tensors": len(self.mask.names),
                "kept_fraction": kept,
                "threshold": "logit >= 0" if self._export_mask == "threshold" else None,
            }
        }

    def _sampled_objective(self, batch, coefficients=None, draw: int = 0):
        """The objective on ``batch`` under this step's relaxed mask sample ``draw``."""
        masks = self.mask.sample(self._mask_gen(draw))
        return self.loss_fn(self.step_outputs(batch, self.loss_fn, coefficients=coefficients, masks=masks))


class ConcreteTaskArithmetic(_ConcreteMixin, MergeModule):
    """Concrete Task Arithmetic: fixed λ, learned shared mask.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        scale: the fixed λ (0.3), or the coefficients' initial value when they are trained.
        coefficients: ``fixed`` (the paper: λ = ``scale``, not trained), ``task`` or ``layer`` (trained with the
            mask: one per task, or one per task and parameter tensor).
        mask: ``shared`` (one mask for every task, the paper) or ``task`` (one mask per task, each rescaled by its
            own mean; ours: T times the logits).
        mask_temperature: the Concrete distribution's temperature (0.5).
        include: regex of tensor names to mask (``None``: all).
        mask_dtype: logits dtype (``float32``/``bfloat16``).
        export_mask: the deterministic mask exported (see :meth:`ConcreteMask.hard`): ``threshold`` (keep
            logit ≥ 0), ``sample`` (seeded Bernoulli draw), ``continuous`` (one seeded relaxed sample, what FusionBench
            evaluates) or ``expected`` (``sigmoid(logit)``).
        objective: the unlabeled objective: a name or ``{name: ..., <options>}``
            (:class:`adamerge.objectives.Objective`).
        mask_seed: seeds the relaxed samples during training and the exported draw.
        lr: learning rate of the logits (and of trained coefficients).
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ``optimizer``,
            ...; see :class:`~adamerge.methods.base.MergeModule`).
    """

    method = "concrete_task_arithmetic"

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        scale: float = 0.3,
        mask_temperature: float = 0.5,
        include: str | None = None,
        mask_dtype: str = "float32",
        export_mask: str = "threshold",
        mask_seed: int = 0,
        lr: float = 1e-3,
        objective: Objective | str = "entropy",
        coefficients: str = "fixed",
        mask: str = "shared",
        **shared,
    ) -> None:
        ConcreteMask.check_mode(export_mask)
        self._check_sharing(mask)
        if coefficients != "fixed" and coefficients not in GRANULARITIES:
            raise MergeInputError(
                f"coefficients: unknown value {coefficients!r}; allowed: fixed (λ = scale, the "
                f"paper), {', '.join(GRANULARITIES)} (trained with the mask)"
            )
        self.loss_fn = Objective.of(objective)
        self._scale, self._export_mask, self._mask_seed = scale, export_mask, mask_seed
        self._coefficient_mode = coefficients
        super().__init__(base, models, **shared)
        self._build_mask(mask_temperature, include, mask_dtype, mask)

    def build_coefficients(self, pool):
        mode = self._coefficient_mode
        c = Coefficients(len(pool.task_names), len(pool.param_names), "task" if mode == "fixed" else mode, self._scale)
        return c.requires_grad_(mode != "fixed")

    def manifest_fields(self):
        return {
            "hparams": {"scale": self._scale, "lr": self.hparams.lr, "coefficients": self._coefficient_mode},
            **self.mask_manifest(),
        }

    def training_step(self, batch, batch_idx):
        loss, per_task = self._sampled_objective(batch)
        self.log_step(loss, per_task, batch)
        return loss


def _halves(batch):
    """Split every task's rows of a step into two batches (inner / outer), alternating: rows 0, 2, 4, ... inner,
    1, 3, 5, ... outer (a task with one row: that row in both). Under data parallelism each rank holds a contiguous
    share of every task's rows; with an even share the ranks' inner rows together are one process's inner rows, so
    the split does not depend on how many processes run."""
    inner, outer, start = [], [], 0
    for n in batch["sizes"]:
        rows = torch.arange(start, start + n)
        inner.append(rows[0::2])
        outer.append(rows[1::2] if n > 1 else rows)
        start += n

    def take(pieces):
        idx = torch.cat(pieces)
        return {
            "inputs": {k: v[idx] for k, v in batch["inputs"].items()},
            "tasks": batch["tasks"],
            "sizes": [len(p) for p in pieces],
        }

    return take(inner), take(outer)


class ConcreteAdaMerging(_ConcreteMixin, AdaMerging):
    """Concrete AdaMerging: meta-learned mask, then AdaMerging under the frozen hard mask.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        granularity: ``task`` or ``layer`` coefficients.
        init: λ initial (and meta-reset) value.
        meta_steps: steps of mask meta-learning before AdaMerging starts.
        inner_lr: SGD learning rate of the inner λ step (1.0).
        mask_lr: Adam learning rate of the mask logits.
        lr: Adam learning rate of λ in the AdaMerging phase.
        mask, mask_temperature, include, mask_dtype, export_mask, mask_seed: as :class:`ConcreteTaskArithmetic`.
        objective: the objective of both phases (see :class:`adamerge.objectives.Objective`).
        clamp: as :class:`AdaMerging`.
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ``optimizer``,
            ...; see :class:`~adamerge.methods.base.MergeModule`).
    """

    method = "concrete_adamerging"

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        granularity: str = "layer",
        init: float = 0.3,
        meta_steps: int = 200,
        inner_lr: float = 1.0,
        mask_lr: float = 1e-3,
        lr: float = 1e-3,
        mask_temperature: float = 0.5,
        include: str | None = None,
        mask_dtype: str = "float32",
        export_mask: str = "threshold",
        mask_seed: int = 0,
        clamp: bool = False,
        objective: Objective | str = "entropy",
        mask: str = "shared",
        **shared,
    ) -> None:
        if meta_steps < 0:
            raise MergeInputError(f"meta_steps must be >= 0, got {meta_steps}")
        ConcreteMask.check_mode(export_mask)
        self._check_sharing(mask)
        self._export_mask, self._mask_seed = export_mask, mask_seed
        super().__init__(
            base, models, granularity=granularity, init=init, clamp=clamp, lr=lr, objective=objective, **shared
        )
        self._build_mask(mask_temperature, include, mask_dtype, mask)
        self.automatic_optimization = False
        self._frozen_mask = None

    def manifest_fields(self):
        fields = super().manifest_fields()
        # the objective's options keep their names (its KL `temperature`); the mask's is `mask.temperature`
        hparams = {**fields["hparams"], "mask_lr": self.hparams.mask_lr, "inner_lr": self.hparams.inner_lr}
        return {**fields, "hparams": hparams, "meta_steps": self.hparams.meta_steps, **self.mask_manifest()}

    def configure_optimizers(self):
        mask_opt = self.build_optimizer(self.mask.parameters(), self.hparams.mask_lr)
        coef_opt = self.build_optimizer([self.merged.coefficients.weight], self.hparams.lr)
        return [mask_opt, coef_opt]

    def meta_step(self, batch):
        """One first-order meta step: reset λ, inner step on half the rows, the outer objective trains the mask."""
        inner, outer = _halves(batch)
        lam0 = torch.full_like(self.merged.coefficients.matrix(), self.hparams.init).requires_grad_(True)
        loss_in, _ = self._sampled_objective(inner, self._lam_view(lam0), 0)
        (g,) = torch.autograd.grad(loss_in, lam0, retain_graph=False)
        group = self.data_parallel_group()
        if group is not None:  # every rank takes the same inner step, on the ranks' mean gradient (DDP's average)
            import torch.distributed as dist

            g = all_sum(g, group) / dist.get_world_size(group)
        lam1 = (lam0 - self.hparams.inner_lr * g).detach()
        loss_out, per_task = self._sampled_objective(outer, self._lam_view(lam1), 1)
        return loss_out, per_task

    def on_fit_start(self) -> None:
        """Refuse plain DDP before the first step: the mask trains alone for ``meta_steps``, then λ alone, so every
        step leaves one of them without a gradient, which DDP only accepts when told to look for unused parameters
        (otherwise torch fails at the second step, after a step's work)."""
        from torch.nn.parallel import DistributedDataParallel

        wrapped = self.trainer.model
        if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
            raise MergeInputError(
                "ConcreteAdaMerging trains the mask (meta_steps) and then the coefficients, each step leaving the "
                "other unused, which DDP refuses unless told: use --trainer.strategy ddp_find_unused_parameters_true "
                "(or DDPStrategy(find_unused_parameters=True))"
            )

    def _lam_view(self, lam):
        return lam.clamp(0, 1) if self._clamp else lam

    def training_step(self, batch, batch_idx):
        mask_opt, coef_opt = self.optimizers()
        if self.global_step < self.hparams.meta_steps:
            loss, per_task = self.meta_step(batch)
            mask_opt.zero_grad()
            self.manual_backward(loss)
            mask_opt.step()
        else:
            if self._frozen_mask is None:
                self._frozen_mask = self.hard_mask()
                self.mask.requires_grad_(False)
            loss, per_task = self.loss_fn(self.step_outputs(batch, self.loss_fn, masks=self._frozen_mask))
            coef_opt.zero_grad()
            self.manual_backward(loss)
            coef_opt.step()
        self.log_step(loss, per_task, batch, phase=float(self.global_step >= self.hparams.meta_steps))

    def trainable_state_keys(self):
        return {n for n, _ in self.named_parameters() if n.startswith(("mask.", "merged.coefficients."))}
