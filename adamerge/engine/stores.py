"""TaskVectorStore: the frozen task vectors of one block of tensors (dense, low-rank or sparse), merged in its
forward."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from adamerge.core.functional import (
    SparseStack,
    merge_dense,
    merge_low_rank,
    merge_sparse,
    merge_tensor,
    sparse_to_dense,
    to_sparse_stack,
)
from adamerge.errors import MergeInputError


class TaskVectorStore(nn.Module):
    """The frozen task vectors of one block of tensors; ``forward`` merges them into the given base weights.

    Dense task vectors are ``[T, ...]``; LoRA ones are factor pairs ``B [T, out, r]``, ``A [T, r, in]``. They are
    frozen parameters (``requires_grad=False``) so that FSDP2 (``fully_shard``) can shard them across ranks: the
    merge runs inside this module's forward, where FSDP2 gathers them, and again for the backward. After
    :meth:`to_sparse`, dense ones are kept as their non-zero entries (:class:`~adamerge.core.functional.SparseStack`),
    as
    frozen parameters too — not buffers, which DDP would broadcast at every step — and such stores are left
    replicated under FSDP2.
    """

    def __init__(self, names: list[str], dense: dict[str, Tensor], low_rank: dict[str, tuple[Tensor, Tensor]]):
        super().__init__()
        self.names = names
        self.offloaded = False  # True: the stacks stay in CPU memory whatever device the model moves to
        self.dense_keys: dict[str, str] = {}
        self.lr_keys: dict[str, tuple[str, str]] = {}
        self.sparse_keys: dict[str, tuple[str, str]] = {}
        self.sparse_meta: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # name -> (counts, shape)
        for i, n in enumerate(names):
            if n in dense:
                self.dense_keys[n] = f"tv_{i}"
                self.register_parameter(f"tv_{i}", nn.Parameter(dense[n], requires_grad=False))
            else:
                B, A = low_rank[n]
                self.lr_keys[n] = (f"B_{i}", f"A_{i}")
                self.register_parameter(f"B_{i}", nn.Parameter(B, requires_grad=False))
                self.register_parameter(f"A_{i}", nn.Parameter(A, requires_grad=False))

    def _apply(self, fn, recurse=True):
        return self if self.offloaded else super()._apply(fn, recurse)

    @torch.no_grad()
    def offload(self) -> None:
        """Keep the dense stacks in CPU memory (pinned when CUDA is present): ``.to(device)`` leaves them there and
        the merge copies each one to the compute device in bounded chunks, in the forward and again in the
        backward, so the device holds one piece of them (at most ``CAST_CHUNK_BYTES``) at a time instead of all."""
        if self.lr_keys or self.sparse_keys:
            kind = "low-rank (LoRA)" if self.lr_keys else "sparse (prep.sparse_storage)"
            name = next(iter(self.lr_keys or self.sparse_keys))
            raise MergeInputError(
                f"prep.offload: tensor {name!r} has a {kind} task vector; offloading streams dense stacks only"
            )
        pin = torch.cuda.is_available()
        for p in self.parameters():
            p.data = p.data.cpu().pin_memory() if pin else p.data.cpu()
        self.offloaded = True

    def sparse_stack(self, name: str) -> SparseStack:
        counts, shape = self.sparse_meta[name]
        idx, val = (getattr(self, k) for k in self.sparse_keys[name])
        return SparseStack(idx, val, counts, shape)

    def dense(self, name: str) -> Tensor:
        """The ``[T, ...]`` stack of ``name`` (the stored parameter; a new dense copy when stored sparse)."""
        if name in self.sparse_keys:
            return sparse_to_dense(self.sparse_stack(name))
        return getattr(self, self.dense_keys[name])

    def _store_sparse(self, name: str, tv: Tensor) -> None:
        st = to_sparse_stack(tv)
        i = self.names.index(name)
        self.sparse_keys[name] = (f"si_{i}", f"sv_{i}")
        self.sparse_meta[name] = (st.counts, st.shape)
        for key, t in zip(self.sparse_keys[name], (st.index, st.values)):
            if key in self._parameters:
                delattr(self, key)
            self.register_parameter(key, nn.Parameter(t, requires_grad=False))

    def set_dense(self, name: str, tv: Tensor) -> None:
        """Replace the stack of ``name`` (kept sparse if it was)."""
        if name in self.sparse_keys:
            self._store_sparse(name, tv.to(getattr(self, self.sparse_keys[name][1])))
        else:
            p = getattr(self, self.dense_keys[name])
            p.data = tv.to(p)

    @torch.no_grad()
    def to_sparse(self) -> None:
        """Keep every dense stack as its non-zero entries (frees the dense parameters)."""
        for name, key in list(self.dense_keys.items()):
            self._store_sparse(name, getattr(self, key))
            delattr(self, key)
            del self.dense_keys[name]

    def forward(
        self,
        base: Mapping[str, Tensor],
        lam: Tensor,
        masks: Mapping[str, Tensor] | None = None,
        skip: Collection[str] = (),
    ) -> dict[str, Tensor]:
        """``{name: θ0 + Σ_t lam[t, j] τ_t}`` for this block's tensors (``lam``: ``[T, len(names)]``) but those in
        ``skip``."""
        if skip:
            keep = [j for j, n in enumerate(self.names) if n not in skip]
            names, lam = [self.names[j] for j in keep], lam[:, keep]
        else:
            names = self.names
        masked = bool(masks) and any(n in masks for n in names)
        if not self.lr_keys and not masked and (not self.sparse_keys or not self.dense_keys):  # one autograd node
            if self.sparse_keys:
                merged = merge_sparse([base[n] for n in names], [self.sparse_stack(n) for n in names], lam)
            else:
                merged = merge_dense([base[n] for n in names], [getattr(self, self.dense_keys[n]) for n in names], lam)
            return dict(zip(names, merged))
        out = {}
        for j, n in enumerate(names):
            mask = None if masks is None else masks.get(n)
            if mask is not None and n not in self.dense_keys:
                kind = "low-rank (LoRA)" if n in self.lr_keys else "sparse (prep.sparse_storage)"
                raise MergeInputError(f"masks: tensor {n!r} has a {kind} task vector; masks need dense ones")
            if n in self.lr_keys:
                B, A = (getattr(self, k) for k in self.lr_keys[n])
                out[n] = merge_low_rank(base[n], B, A, lam[:, j])
            elif n in self.sparse_keys:
                out[n] = merge_sparse([base[n]], [self.sparse_stack(n)], lam[:, j : j + 1])[0]
            else:
                out[n] = merge_tensor(base[n], getattr(self, self.dense_keys[n]), lam[:, j], mask)
        return out


def _is_sharded(t: Tensor) -> bool:
    """True for a DTensor (FSDP2 shards), whose rows cannot be read outside its module's forward."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
