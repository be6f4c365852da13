"""Pure tensor math for model merging. No modules, no I/O.

Notation (see docs/methods): base weights ``θ0``, task vectors ``τ_t = θ_t − θ0`` stacked along a leading task axis
``[T, ...]``, coefficients ``λ`` of shape ``[T]`` for one tensor.

    merge:        θ = θ0 + Σ_t λ_t · (m ⊙ τ_t)
    TIES:         trim each τ_t to its top-k magnitudes, elect a sign per element (sign of Σ_t trimmed τ_t),
                  keep entries that agree with it; disjoint mean = Σ kept / #kept
    DARE:         keep each element with probability 1 − p, rescale the survivors by 1 / (1 − p)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def merge_tensor(base: Tensor, task_vectors: Tensor, coefficients: Tensor, mask: Tensor | None = None) -> Tensor:
    """``θ0 + Σ_t λ_t (m ⊙ τ_t)`` with one ``tensordot``; computed in ``base.dtype`` whatever the storage dtype."""
    tv = task_vectors.to(base.dtype)
    if mask is not None:
        tv = tv * mask.to(base.dtype)
    return base + torch.tensordot(coefficients.to(base.dtype), tv, dims=1)


def merge_low_rank(base: Tensor, B: Tensor, A: Tensor, coefficients: Tensor) -> Tensor:
    """``θ0 + Σ_t λ_t B_t A_t`` for LoRA task vectors stored as ``B [T, out, r]``, ``A [T, r, in]`` (never forms
    the T dense deltas: one ``[out, T·r] @ [T·r, in]`` product)."""
    T, out_dim, r = B.shape
    lam = coefficients.to(base.dtype)
    left = (B.to(base.dtype) * lam[:, None, None]).permute(1, 0, 2).reshape(out_dim, T * r)
    return base + left @ A.to(base.dtype).reshape(T * r, -1)


def topk_mask(values: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``density`` fraction of largest-magnitude entries along the last axis (ties kept)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    n = values.shape[-1]
    k = max(1, int(round(n * density)))
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    mag = values.abs().float()
    # the k-th largest magnitude = the (n - k + 1)-th smallest
    threshold = mag.kthvalue(n - k + 1, dim=-1, keepdim=True).values
    return mag >= threshold


def ties_trim_elect(task_vectors: Mapping[str, Tensor], density: float = 0.2, scope: str = "global") -> dict[str, Tensor]:
    """TIES steps 1–2 on stacked task vectors ``{name: [T, ...]}``.

    Returns the task vectors with entries outside each task's top-``density`` magnitudes, and entries whose sign
    disagrees with the elected sign, set to zero. ``scope="global"`` ranks magnitudes over the whole model per task
    (as in the TIES paper); ``"tensor"`` ranks within each tensor (less memory for very large models).
    """
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    names = list(task_vectors)
    if scope == "global":
        T = next(iter(task_vectors.values())).shape[0]
        flat = torch.cat([task_vectors[n].reshape(T, -1).float() for n in names], dim=1)
        keep_flat = topk_mask(flat, density)
        del flat
        sizes = [task_vectors[n][0].numel() for n in names]
        keeps = dict(zip(names, keep_flat.split(sizes, dim=1)))
        keeps = {n: keeps[n].reshape(task_vectors[n].shape) for n in names}
    else:
        keeps = {n: topk_mask(tv.reshape(tv.shape[0], -1), density).reshape(tv.shape) for n, tv in task_vectors.items()}
    out = {}
    for n in names:
        trimmed = task_vectors[n] * keeps[n]
        elected = torch.sign(trimmed.float().sum(dim=0, keepdim=True))
        out[n] = trimmed * (torch.sign(trimmed.float()) == elected)
    return out


def disjoint_normalize(task_vectors: Tensor, weights: Tensor | None = None) -> Tensor:
    """Divide each entry by the summed weight of the tasks that keep it (non-zero there).

    With unit weights, ``disjoint_normalize(τ).sum(0)`` is TIES' disjoint mean; with mixing weights ``w`` (M3),
    ``Σ_t w_t disjoint_normalize(τ, w)_t`` interpolates the coordinates several tasks keep and passes through the
    coordinates one task keeps.
    """
    T = task_vectors.shape[0]
    w = torch.ones(T) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    w = w.to(task_vectors.device).reshape(T, *([1] * (task_vectors.ndim - 1)))
    kept = (task_vectors != 0).float()
    denom = (kept * w).sum(dim=0, keepdim=True)
    return (task_vectors.float() / torch.where(denom > 0, denom, torch.ones_like(denom))).to(task_vectors.dtype)


def disjoint_mean(task_vectors: Tensor) -> Tensor:
    """TIES step 3: mean over the tasks whose entry is non-zero (0 where none is)."""
    return disjoint_normalize(task_vectors).sum(dim=0)


def dare(task_vectors: Tensor, drop_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Drop each element with probability ``drop_rate``, rescale survivors by ``1 / (1 − drop_rate)``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if drop_rate == 0.0:
        return task_vectors
    keep = torch.rand(task_vectors.shape, generator=generator, device=task_vectors.device) >= drop_rate
    return task_vectors * keep / (1.0 - drop_rate)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` along the last axis (nats), one value per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
