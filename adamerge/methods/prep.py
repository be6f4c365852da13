"""Task-vector pre-processing applied once before merging or training: DARE, TIES trim-and-elect, SVD subspaces
(TSV-M, Iso-C), sparse storage and CPU offload — one `prep` every method takes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adamerge.core.functional import SUBSPACE_METHODS, dare, subspace_pieces, ties_trim_elect
from adamerge.errors import MergeInputError
from adamerge.io.safetensors import store_dtype


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
            see :class:`adamerge.core.functional.SparseStack`): less memory below half density in float32 (a third in
            bfloat16), e.g. TIES or DARE; the same merge. Not with learned masks (Concrete); FSDP2 leaves sparse stores
            replicated.
        subspace: ``tsv`` (TSV-M) or ``iso_c`` (Iso-C): replace the task vectors by per-task pieces of that SVD-based
            merge (:func:`adamerge.core.functional.subspace_pieces`), whose sum is the method's merged update — so
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
            raise MergeInputError(
                f"prep.subspace: unknown value {self.subspace!r}; allowed: {', '.join(SUBSPACE_METHODS)}"
            )
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
            raise MergeInputError(
                f"prep: expected a mapping of {', '.join(cls.__dataclass_fields__)} or a "
                f"TaskVectorPrep, got {type(prep).__name__}"
            )
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
