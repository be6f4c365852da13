"""Data-free merges: simple average, Task Arithmetic, TIES, DARE (via ``prep``) and Mixup Model Merge (M3).

Each is a fixed choice of coefficients over (possibly pre-processed) task vectors, so all share the merge and export
path of the trained methods:

    average          θ0 + (1/T) Σ τ_t                    = mean_t θ_t
    task_arithmetic  θ0 + λ Σ τ_t
    ties             θ0 + λ · disjoint_mean(trim_elect(τ))
    dare             prep.dare_rate > 0 on any of the above (``DARE+TA``: task_arithmetic with dare_rate)
    m3               θ0 + s Σ_t w_t τ_t, w ~ Dirichlet(α·1) (Beta(α, α) for T = 2); with TIES the coordinates that
                     several tasks keep are interpolated and those one task keeps pass through
    tsv_m            θ0 + α Δ_TSV  (per matrix: each task's top singular vectors, decorrelated; others: mean τ)
    iso_c            θ0 + α σ̄ U Vᵀ (per matrix: the TA sum with a flat spectrum; others: mean τ)

TSV-M and Iso-C are ``prep.subspace`` (per-task pieces that sum to the merge) with coefficients α, so AdaMerging
with the same ``prep`` learns coefficients over them.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from adamerge.core.batchnorm import batch_statistics
from adamerge.core.functional import disjoint_normalize
from adamerge.errors import MergeInputError
from adamerge.methods.base import MergeModule
from adamerge.methods.prep import TaskVectorPrep
from adamerge.objectives import entropy_objective
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool

log = logging.getLogger(__name__)


def _fixed(values, pool: TaskVectorPool) -> Coefficients:
    c = Coefficients(len(pool.task_names), len(pool.param_names), "task", torch.as_tensor(values, dtype=torch.float32))
    return c.requires_grad_(False)


class Average(MergeModule):
    """Simple weight average of the fine-tuned models.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ...; see
            :class:`~adamerge.methods.base.MergeModule`).
    """

    trainable = False
    method = "average"

    def build_coefficients(self, pool):
        return _fixed([1.0 / len(pool.task_names)] * len(pool.task_names), pool)


class TaskArithmetic(MergeModule):
    """Task Arithmetic: ``θ0 + λ Σ_t τ_t`` (with ``prep.dare_rate`` > 0 this is DARE+TA).

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        scale: λ (default 0.3).
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ...; see
            :class:`~adamerge.methods.base.MergeModule`).
    """

    trainable = False
    method = "task_arithmetic"

    def __init__(self, base: str, models: dict[str, str], scale: float = 0.3, **shared) -> None:
        self._scale = scale
        super().__init__(base, models, **shared)

    def build_coefficients(self, pool):
        return _fixed([self._scale] * len(pool.task_names), pool)

    def manifest_fields(self):
        return {"hparams": {"scale": self._scale}}


class Ties(MergeModule):
    """TIES-Merging: trim to the top ``prep.ties_density`` magnitudes, elect signs, disjoint mean, scale λ.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        scale: λ applied to the disjoint mean (1.0 = the paper's merge).
        shared: the arguments every method takes (see :class:`~adamerge.methods.base.MergeModule`); TIES's own
            settings are ``prep``'s: ``ties_density`` (the fraction of each task vector kept; 0.2 as the paper when
            unset), ``ties_scope``, and ``dare_rate``/``seed`` for DARE before trimming (DARE+TIES).
    """

    trainable = False
    method = "ties"

    def __init__(self, base: str, models: dict[str, str], scale: float = 1.0, **shared) -> None:
        self._scale = scale
        prep = TaskVectorPrep.of(shared.pop("prep", None))
        if prep.ties_density is None:
            prep = dataclasses.replace(prep, ties_density=0.2)
        super().__init__(base, models, prep=prep, **shared)

    def build_coefficients(self, pool):
        return _fixed([self._scale] * len(pool.task_names), pool)

    def post_init(self, pool):
        self.merged.set_task_vectors({n: disjoint_normalize(tv) for n, tv in self.merged.task_vectors().items()})

    def manifest_fields(self):
        return {"hparams": {"scale": self._scale}}


class _SubspaceMerge(TaskArithmetic):
    """An SVD-based data-free merge: Task Arithmetic over the ``prep.subspace`` pieces of the task vectors."""

    subspace = ""

    def __init__(self, base: str, models: dict[str, str], scale: float = 1.0, **shared) -> None:
        prep = TaskVectorPrep.of(shared.pop("prep", None))
        if prep.subspace not in (None, self.subspace):
            raise MergeInputError(f"prep.subspace: {self.method} sets it to {self.subspace!r}, got {prep.subspace!r}")
        super().__init__(base, models, scale=scale, prep=dataclasses.replace(prep, subspace=self.subspace), **shared)


class TSVM(_SubspaceMerge):
    """TSV-M, Task Singular Vectors Merge (Gargiulo et al., CVPR 2025): per weight matrix, each task vector's top
    ``⌊min(m, n)/T⌋`` singular triplets, their left and right singular vectors replaced by the closest orthonormal
    matrices (removing the tasks' overlap), recombined with their singular values; biases, norms and the token
    embeddings take the mean of the task vectors. ``θ0 + scale · Δ``, scale 1.0 as in the paper (ViT-B/32, 8 tasks:
    85.9). See :func:`adamerge.core.functional.tsv_pieces`.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        scale: α applied to the merged update (1.0 = the paper).
        shared: the arguments every method takes (see :class:`~adamerge.methods.base.MergeModule`); ``prep`` adds
            pre-processing (DARE/TIES run before the SVD; ``subspace_skip`` names the matrices kept out).
    """

    method = "tsv_m"
    subspace = "tsv"


class IsoC(_SubspaceMerge):
    """Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025): per weight matrix, the Task
    Arithmetic sum ``Σ_t τ_t = U S Vᵀ`` with its singular values replaced by their mean, ``σ̄ U Vᵀ``; biases, norms
    and the token embeddings take the mean of the task vectors. ``θ0 + scale · Δ``; the paper picks the scale on
    held-out validation data (ViT-B/32, 8 tasks: 86.3); 1.0 here keeps the TA sum's nuclear norm. See
    :func:`adamerge.core.functional.iso_c_pieces`.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        scale: α applied to the merged update.
        shared: the arguments every method takes (see :class:`~adamerge.methods.base.MergeModule`); ``prep`` adds
            pre-processing (DARE/TIES run before the SVD; ``subspace_skip`` names the matrices kept out).
    """

    method = "iso_c"
    subspace = "iso_c"


class M3(MergeModule):
    """Mixup Model Merge (Zhou et al. 2025), generalised to T tasks.

    Draws mixing weights ``w ~ Dirichlet(α·1_T)`` (``Beta(α, α)`` for two tasks: ``w = (λ, 1−λ)``) and merges
    ``θ0 + s Σ_t w_t τ_t``. ``s = 1`` is weight interpolation ``Σ w_t θ_t``. With ``prep.ties_density`` set,
    coordinates kept by several tasks are interpolated by their renormalised weights; with ``prep.dare_rate`` DARE
    drops first.

    Beyond the paper, ``candidates = K > 1`` draws K weight vectors and keeps the one with the lowest unlabeled-data
    entropy (needs a data module; see :meth:`select`). The draws and the choice are recorded in the manifest.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model.
        alpha: Beta/Dirichlet concentration (0.5 default).
        scale: s.
        seed: seeds the draw(s) (``prep.seed`` seeds DARE).
        candidates: K draws to choose from by entropy (1 = the paper's single draw).
        eval_batches: unlabeled steps used to score each candidate.
        shared: the arguments every method takes (``prep``, ``tv_dtype``, ``task_type``, ``heads``, ...; see
            :class:`~adamerge.methods.base.MergeModule`).
    """

    trainable = False
    method = "m3"

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        alpha: float = 0.5,
        scale: float = 1.0,
        seed: int = 0,
        candidates: int = 1,
        eval_batches: int = 4,
        **shared,
    ) -> None:
        if alpha <= 0:
            raise MergeInputError(f"alpha must be > 0, got {alpha}")
        if candidates < 1:
            raise MergeInputError(f"candidates must be >= 1, got {candidates}")
        self._alpha, self._scale, self._seed, self._k = alpha, scale, seed, candidates
        self._eval_batches = eval_batches
        self.draws = draw_mixing_weights(len(models), alpha, seed, candidates)
        self.chosen, self.scores = 0, None
        self.needs_data = candidates > 1
        super().__init__(base, models, **shared)

    def build_coefficients(self, pool):
        return _fixed(self._scale * self.draws[self.chosen], pool)

    def post_init(self, pool):
        self._raw_tv = self.merged.task_vectors() if self.prep.ties_density is not None else None
        self._use(self.chosen)

    def _use(self, k: int) -> None:
        self.chosen = k
        w = torch.as_tensor(self.draws[k], dtype=torch.float32)
        self.merged.coefficients.weight.data.copy_(self._scale * w)
        if self._raw_tv is not None:
            self.merged.set_task_vectors({n: disjoint_normalize(tv, w) for n, tv in self._raw_tv.items()})

    @torch.no_grad()
    def use_data(self, datamodule) -> None:
        """Score every candidate by the summed entropy on ``eval_batches`` unlabeled steps; keep the lowest. A
        BatchNorm backbone normalises each step with its own statistics (the base's running ones do not describe a
        candidate's layers; the export's are re-estimated on such steps)."""
        batches = datamodule.first_steps(self._eval_batches)
        scores = []
        for k in range(self._k):
            self._use(k)
            with batch_statistics(self.merged.backbone):  # a no-op without BatchNorm layers
                scores.append(
                    float(
                        sum(entropy_objective(self.merged(b["inputs"], b["tasks"], b["sizes"]))[0] for b in batches)
                        / len(batches)
                    )
                )
        self.scores = scores
        self._use(int(np.argmin(scores)))
        log.info("m3: candidate entropies %s, chose %d", [round(s, 4) for s in scores], self.chosen)

    def manifest_fields(self):
        return {
            "hparams": {"alpha": self._alpha, "scale": self._scale, "seed": self._seed, "candidates": self._k},
            "m3": {
                "draws": self.draws.tolist(),
                "chosen": self.chosen,
                "weights": self.draws[self.chosen].tolist(),
                "entropy_scores": self.scores,
                "distribution": "beta" if len(self.task_names) == 2 else "dirichlet",
            },
        }


def draw_mixing_weights(num_tasks: int, alpha: float, seed: int, k: int = 1) -> np.ndarray:
    """``[k, T]`` mixing weights: Beta(α, α) → (λ, 1−λ) for T = 2, Dirichlet(α·1_T) otherwise; seeded."""
    rng = np.random.default_rng(seed)
    if num_tasks == 2:
        lam = rng.beta(alpha, alpha, size=k)
        return np.stack([lam, 1.0 - lam], axis=1)
    return rng.dirichlet([alpha] * num_tasks, size=k)
