"""Pure tensor math for model merging. No modules, no I/O.

Notation (see docs/methods): base weights ``θ0``, task vectors ``τ_t = θ_t − θ0`` stacked along a leading task axis
``[T, ...]``, coefficients ``λ`` of shape ``[T]`` for one tensor.

    merge:        θ = θ0 + Σ_t λ_t · (m ⊙ τ_t)
    TIES:         trim each τ_t to its top-k magnitudes, elect a sign per element (sign of Σ_t trimmed τ_t),
                  keep entries that agree with it; disjoint mean = Σ kept / #kept
    DARE:         keep each element with probability 1 − p, rescale the survivors by 1 / (1 − p)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

# Bytes of compute-dtype temporaries one merge step may hold while up-casting a low-precision stack or copying an
# offloaded one to the compute device (16 MiB).
CAST_CHUNK_BYTES = 16 * 2**20


def _cast_chunks(tv: Tensor, dtype: torch.dtype, device: torch.device | None = None):
    """Yield ``(start, tv[start:stop] in dtype on device)`` over the task axis; a stack already in that dtype and on
    that device comes back whole, uncopied; otherwise in groups of tasks whose copy stays under
    :data:`CAST_CHUNK_BYTES` (from pinned CPU memory, the copies are asynchronous)."""
    device = tv.device if device is None else device
    step = _task_group(tv, dtype, device)
    if step is None:
        yield 0, tv
        return
    scratch = _scratch(dtype, device, min(tv.shape[0], step) * tv[0].numel())
    for s in range(0, tv.shape[0], step):
        part = tv[s : s + step]
        buf = scratch[: part.numel()].view(part.shape)
        buf.copy_(part, non_blocking=True)
        yield s, buf


def _task_group(tv: Tensor, dtype: torch.dtype, device: torch.device) -> int | None:
    """How many tasks of a ``[T, ...]`` stack one copy into ``dtype`` on ``device`` takes (its copy stays under
    :data:`CAST_CHUNK_BYTES`); None when the stack is already there and needs no copy. Whole tables and their rows
    (:func:`_gather_chunks`) are grouped alike, so both sum the tasks in the same order."""
    if tv.dtype == dtype and tv.device == device:
        return None
    per_task = max(1, tv[0].numel() * torch.empty((), dtype=dtype).element_size())
    return max(1, CAST_CHUNK_BYTES // per_task)


_SCRATCH = threading.local()


def _scratch(dtype: torch.dtype, device: torch.device, numel: int) -> Tensor:
    """A buffer of at least ``numel`` elements reused by every up-cast or device copy of this thread (per dtype and
    device): the copies allocate nothing, so repeated merges leave no freed temporaries behind to fragment the heap
    (on CPU those showed as ~100 MiB of extra resident memory per step at T = 8). Grows to the largest request,
    which :data:`CAST_CHUNK_BYTES` bounds unless one task's tensor is larger."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (dtype, torch.device(device))
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        cache[key] = buf = torch.empty(numel, dtype=dtype, device=device)
    return buf


class _DenseMerge(torch.autograd.Function):
    """``θ0_j + Σ_t λ[t, j] τ_j[t]`` for a group of k tensors at once; the backward saves only the stored stacks and
    ``λ``, and returns ``∂L/∂λ`` as one ``[T, k]`` tensor.

    Each tensor costs one fused ``addmv`` forward and one ``mv`` backward: no per-tensor ``select`` of ``λ`` in the
    graph and one autograd node per group, which matters on GPUs where a step is launch-bound. The generic graph of
    ``base + tensordot(λ, τ.float())`` would also keep the float32 copy of a bfloat16 stack alive until the backward;
    here the up-cast happens in bounded chunks (:data:`CAST_CHUNK_BYTES`), in the forward and again in the backward.
    """

    @staticmethod
    def forward(ctx, lam: Tensor, *tensors: Tensor):
        k = lam.shape[1]
        bases, stacks = tensors[:k], tensors[k:]
        ctx.save_for_backward(lam, *stacks)
        outs = []
        for j, (base, tv) in enumerate(zip(bases, stacks)):
            out = base.reshape(-1)
            for s, chunk in _cast_chunks(tv, base.dtype, base.device):
                out = torch.addmv(out, chunk.reshape(chunk.shape[0], -1).t(), lam[s : s + chunk.shape[0], j])
            outs.append(out.view(base.shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        lam, *stacks = ctx.saved_tensors
        k = len(stacks)
        grad_lam = None
        if ctx.needs_input_grad[0]:
            cols = []
            for g, tv in zip(grads, stacks):
                if g is None:
                    cols.append(lam.new_zeros(lam.shape[0]))
                    continue
                g = g.reshape(-1)
                parts = [chunk.reshape(chunk.shape[0], -1) @ g for _, chunk in _cast_chunks(tv, g.dtype, g.device)]
                cols.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            grad_lam = torch.stack(cols, dim=1).to(lam.dtype)
        grad_bases = [g if ctx.needs_input_grad[1 + j] else None for j, g in enumerate(grads)]
        return (grad_lam, *grad_bases, *([None] * k))


def merge_dense(bases: list[Tensor], task_vectors: list[Tensor], coefficients: Tensor) -> list[Tensor]:
    """``[θ0_j + Σ_t λ[t, j] τ_j[t] for j]`` for k tensors; ``coefficients`` is ``[T, k]``, computed in each base's
    dtype whatever the storage dtype of the stacks (see :class:`_DenseMerge`)."""
    if coefficients.ndim != 2 or coefficients.shape[1] != len(bases) or len(bases) != len(task_vectors):
        raise ValueError(
            f"merge_dense: coefficients {tuple(coefficients.shape)} for {len(bases)} bases and "
            f"{len(task_vectors)} task-vector stacks"
        )
    if not bases:
        return []
    return list(_DenseMerge.apply(coefficients.to(bases[0].dtype), *bases, *task_vectors))


class _RowMerge(torch.autograd.Function):
    """``(θ0 + Σ_t λ_t τ_t)[ids]``: the rows of a merged lookup table that ``ids`` reads, without merging (or
    differentiating) the rest of the table. Each distinct row is merged with the arithmetic of :class:`_DenseMerge`
    (the same ``addmv`` over the same groups of tasks), so the rows equal the whole table's bit for bit. The backward
    gathers the same rows again and sums the incoming gradient per distinct row first, exactly as an embedding's
    gradient does (rows at ``padding_idx`` get none)."""

    @staticmethod
    def forward(ctx, lam: Tensor, ids: Tensor, stack: Tensor, base: Tensor, padding_idx: int | None):
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        out = base.index_select(0, uniq).reshape(-1)
        for s, rows in _gather_chunks(stack, uniq, base.dtype, base.device):
            out = torch.addmv(out, rows.reshape(rows.shape[0], -1).t(), lam[s : s + rows.shape[0]])
        ctx.save_for_backward(lam, uniq, inverse, stack)
        ctx.dtype, ctx.device, ctx.padding_idx = base.dtype, base.device, padding_idx
        return out.view(len(uniq), -1)[inverse].view(*ids.shape, stack.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        lam, uniq, inverse, stack = ctx.saved_tensors
        g = grad.reshape(-1, stack.shape[-1]).to(ctx.dtype)
        if ctx.padding_idx is not None:
            g = g.masked_fill((uniq[inverse] == ctx.padding_idx)[:, None], 0)
        per_row = g.new_zeros(len(uniq), g.shape[1]).index_add_(0, inverse, g)
        parts = [(rows * per_row).sum((1, 2)) for _, rows in _gather_chunks(stack, uniq, ctx.dtype, ctx.device)]
        return torch.cat(parts).to(lam.dtype), None, None, None, None


def _gather_chunks(stack: Tensor, rows: Tensor, dtype: torch.dtype, device: torch.device):
    """Yield ``(start, stack[start:stop, rows] in dtype on device)`` over the task axis, in the groups of tasks that
    :func:`_cast_chunks` uses for the whole stack (one group when it needs no copy)."""
    step = _task_group(stack, dtype, device) or stack.shape[0]
    rows = rows.to(stack.device)
    for s in range(0, stack.shape[0], step):
        yield s, stack[s : s + step].index_select(1, rows).to(device=device, dtype=dtype, non_blocking=True)


def merge_rows(
    base: Tensor, stack: Tensor, coefficients: Tensor, ids: Tensor, padding_idx: int | None = None
) -> Tensor:
    """``(θ0 + Σ_t λ_t τ_t)[ids]`` for a 2-D lookup table (``stack``: ``[T, V, d]``, ``coefficients``: ``[T]``),
    merging and differentiating only the rows that ``ids`` reads (see :class:`LookupWeight`)."""
    if padding_idx is not None and padding_idx < 0:
        padding_idx += base.shape[0]
    return _RowMerge.apply(coefficients.to(base.dtype), ids, stack, base, padding_idx)


# Tensor functions that only read metadata: a LookupWeight answers them as its base does, without merging.
_METADATA = {
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.element_size,
    Tensor.is_floating_point,
    Tensor.is_complex,
    Tensor.is_contiguous,
    Tensor.stride,
    Tensor.data_ptr,
    Tensor.storage_offset,
    Tensor.__len__,
    Tensor.get_device,
    Tensor.__hash__,
}


class LookupWeight(Tensor):
    """A merged lookup table (an embedding's weight) that is never merged whole when it is only looked up.

    It shares the base table's storage; ``F.embedding`` on it returns ``θ0[ids] + Σ_t λ_t τ_t[ids]`` through
    :func:`merge_rows`, so a step merges and differentiates only the rows its tokens read instead of the whole
    vocabulary (BERT-like encoders: half the model). Any other use (a tied output layer, ``weight.T``, ...)
    gets the whole merged table through ``full()``, so the result is the merged model's whatever the code does;
    metadata (shape, dtype, device) reads the base's. ``coefficients`` (``[T]``) carry the graph to the merge's
    coefficients; ``full()`` returns the whole merged table with that graph.
    """

    @staticmethod
    def __new__(cls, base: Tensor, stack: Tensor, coefficients: Tensor, full):
        t = Tensor._make_subclass(cls, base.detach(), False)
        t._stack, t._lam, t._full = stack, coefficients, full
        return t

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        super().__init__()

    def __repr__(self) -> str:
        return f"LookupWeight(shape={tuple(self.shape)}, tasks={self._stack.shape[0]})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.embedding:
            names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
            call = {**dict(zip(names, args)), **kwargs}
            w = call.get("weight")
            if (
                isinstance(w, LookupWeight)
                and not isinstance(call["input"], LookupWeight)
                and call.get("max_norm") is None
                and not call.get("scale_grad_by_freq")
                and not call.get("sparse")
            ):
                with torch._C.DisableTorchFunctionSubclass():
                    base = w.as_subclass(Tensor)
                return merge_rows(base, w._stack, w._lam, call["input"], call.get("padding_idx"))
        if func in _METADATA or getattr(func, "__name__", "") == "__get__":  # shape, dtype, device, ...
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            if not isinstance(out, Tensor):  # tensor-valued attributes (.T, .data) read the merged table below
                return out
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: a._full() if isinstance(a, LookupWeight) else a, (args, kwargs)
        )
        return func(*args, **kwargs)


def merge_tensor(base: Tensor, task_vectors: Tensor, coefficients: Tensor, mask: Tensor | None = None) -> Tensor:
    """``θ0 + Σ_t λ_t (m ⊙ τ_t)``, computed in ``base.dtype`` whatever the storage dtype of ``task_vectors``.

    Without a mask this is :func:`merge_dense` for one tensor (nothing but the stored stack saved for the backward).
    Masks (which may be learned) take the generic autograd path.
    """
    if mask is None:
        return merge_dense([base], [task_vectors], coefficients[:, None])[0]
    # same arithmetic as the unmasked path (an all-ones mask gives bit-identical weights)
    tv = task_vectors.to(base.device, base.dtype) * mask.to(base.dtype)
    return torch.addmv(base.reshape(-1), tv.reshape(tv.shape[0], -1).t(), coefficients.to(base.dtype)).view(base.shape)


class SparseStack(NamedTuple):
    """The non-zero entries of a stacked task vector ``[T, *shape]``, task after task.

    ``index``: flat positions within one task's tensor (int32 below 2^31 elements), ``values``: the entries (storage
    dtype), ``counts``: entries per task. Per kept entry this costs 8 bytes in float32 (6 in bfloat16) against 4 (2)
    for every entry of the dense stack: it pays below half density in float32 (a third in bfloat16), e.g. after TIES
    trimming (density 0.2: 0.4x the dense bytes in float32) or DARE.
    """

    index: Tensor
    values: Tensor
    counts: tuple[int, ...]
    shape: tuple[int, ...]


def to_sparse_stack(task_vectors: Tensor) -> SparseStack:
    """Keep the non-zero entries of a ``[T, ...]`` stack (see :class:`SparseStack`)."""
    T = task_vectors.shape[0]
    flat = task_vectors.reshape(T, -1)
    index_dtype = torch.int32 if flat.shape[1] < 2**31 else torch.int64
    idx = [flat[t].nonzero().squeeze(1) for t in range(T)]
    return SparseStack(
        torch.cat(idx).to(index_dtype),
        torch.cat([flat[t][i] for t, i in enumerate(idx)]),
        tuple(len(i) for i in idx),
        tuple(task_vectors.shape[1:]),
    )


def sparse_to_dense(stack: SparseStack) -> Tensor:
    """The ``[T, *shape]`` dense stack of a :class:`SparseStack` (a new tensor)."""
    T, n = len(stack.counts), math.prod(stack.shape)
    out = stack.values.new_zeros(T, n)
    o = 0
    for t, c in enumerate(stack.counts):
        out[t, stack.index[o : o + c].long()] = stack.values[o : o + c]
        o += c
    return out.view(T, *stack.shape)


class _SparseMerge(torch.autograd.Function):
    """:class:`_DenseMerge` for task vectors stored as :class:`SparseStack`: per task one ``index_add_`` forward
    (positions are unique within a task, so the result is deterministic on GPUs too) and one gather-dot backward."""

    @staticmethod
    def forward(ctx, lam: Tensor, counts: list[tuple[int, ...]], *tensors: Tensor):
        k = lam.shape[1]
        bases, indexes, values = tensors[:k], tensors[k : 2 * k], tensors[2 * k :]
        ctx.save_for_backward(lam, *indexes, *values)
        ctx.counts = counts
        outs = []
        for j, (base, idx, val) in enumerate(zip(bases, indexes, values)):
            out, o = base.reshape(-1).clone(), 0
            for t, c in enumerate(counts[j]):
                if c:
                    out.index_add_(0, idx[o : o + c], val[o : o + c].to(base.dtype) * lam[t, j])
                o += c
            outs.append(out.view(base.shape))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        lam, *saved = ctx.saved_tensors
        k = lam.shape[1]
        indexes, values = saved[:k], saved[k:]
        grad_lam = None
        if ctx.needs_input_grad[0]:
            grad_lam = lam.new_zeros(lam.shape)
            for j, (g, idx, val) in enumerate(zip(grads, indexes, values)):
                if g is None:
                    continue
                g, o = g.reshape(-1), 0
                for t, c in enumerate(ctx.counts[j]):
                    if c:
                        grad_lam[t, j] = torch.dot(g[idx[o : o + c]], val[o : o + c].to(g.dtype)).to(lam.dtype)
                    o += c
        grad_bases = [g if ctx.needs_input_grad[2 + j] else None for j, g in enumerate(grads)]
        return (grad_lam, None, *grad_bases, *([None] * (2 * k)))


def merge_sparse(bases: list[Tensor], stacks: list[SparseStack], coefficients: Tensor) -> list[Tensor]:
    """:func:`merge_dense` for task vectors stored as :class:`SparseStack` (``coefficients``: ``[T, k]``)."""
    if coefficients.ndim != 2 or coefficients.shape[1] != len(bases) or len(bases) != len(stacks):
        raise ValueError(
            f"merge_sparse: coefficients {tuple(coefficients.shape)} for {len(bases)} bases and "
            f"{len(stacks)} sparse stacks"
        )
    if not bases:
        return []
    return list(
        _SparseMerge.apply(
            coefficients.to(bases[0].dtype),
            [st.counts for st in stacks],
            *bases,
            *[st.index for st in stacks],
            *[st.values for st in stacks],
        )
    )


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


def ties_trim_elect(
    task_vectors: Mapping[str, Tensor], density: float = 0.2, scope: str = "global"
) -> dict[str, Tensor]:
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


def summed_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, total: Callable[[Tensor], Tensor]
) -> Tensor:
    """Batch normalisation (training mode, channels on axis 1) with statistics over every row that ``total`` sums
    across: ``total`` maps a tensor to its sum over the data-parallel ranks. The rows of all ranks together are
    normalised as one batch would be in one process — the mean, then the biased variance around it — and the backward
    sums its per-channel reductions the same way, so that each rank's gradient, averaged over the ranks as DDP does,
    is the one-process gradient. This is what ``torch.nn.SyncBatchNorm`` does on GPUs; it runs on any device and
    backend (gloo included). Per-channel sums accumulate in float64 on CPU, as torch's CPU kernel does (float32
    elsewhere, as its CUDA kernels do): the input gradient is a small difference of such sums, and through a deep
    BatchNorm network plain float32 autograd sums moved a merge coefficient's gradient by 0.6% from its float64 value
    (a 16-row MobileNetV2 step on CPU), torch's kernel and this one by 0.02%."""
    return _SummedBatchNorm.apply(x, weight, bias, eps, total)


def _bn_layout(x: Tensor) -> tuple[list[int], tuple[int, ...], torch.dtype, torch.dtype]:
    """(reduced axes, per-channel broadcast shape, elementwise dtype, sum dtype) of a batch norm over ``x``:
    elementwise in float32 at least, per-channel sums in float64 on CPU (as torch's CPU kernel accumulates)."""
    return (
        [0, *range(2, x.dim())],
        (1, x.shape[1]) + (1,) * (x.dim() - 2),
        torch.promote_types(x.dtype, torch.float32),
        torch.float64 if x.device.type == "cpu" else torch.float32,
    )


class _SummedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, total):
        dims, shape, dtype, acc = _bn_layout(x)
        c = x.shape[1]
        sums = total(torch.cat([x.sum(dims, dtype=acc), x.new_full((1,), x.numel() // c, dtype=acc)]))
        count = sums[c]
        mean = sums[:c] / count
        centred = x.to(dtype) - mean.to(dtype).view(shape)
        invstd = torch.rsqrt(total(centred.square().sum(dims, dtype=acc)) / count + eps).to(dtype)
        out = centred.mul_(invstd.view(shape))
        if weight is not None:
            out = out * weight.to(dtype).view(shape)
        if bias is not None:
            out = out + bias.to(dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total, ctx.count, ctx.bias_dtype = total, count, None if bias is None else bias.dtype
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        dims, shape, dtype, acc = _bn_layout(x)
        c = x.shape[1]
        xhat = (x.to(dtype) - mean.to(dtype).view(shape)).mul_(invstd.view(shape))
        dy = grad.to(dtype)
        local = torch.cat([dy.sum(dims, dtype=acc), (dy * xhat).sum(dims, dtype=acc)])  # Σ dy, Σ dy·x̂ per channel
        dweight = local[c:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = local[:c].to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            every = (ctx.total(local) / ctx.count).to(dtype)  # every rank's rows: the mean of dy and of dy·x̂
            scale = invstd if weight is None else invstd * weight.to(dtype)
            dx = (dy - every[:c].view(shape) - xhat * every[c:].view(shape)).mul_(scale.view(shape)).to(x.dtype)
        return dx, dweight, dbias, None, None


# -- subspace merges: TSV-M and Iso-C, as per-task pieces whose sum is the published merge --------------------------
def _svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(m, full_matrices=False)


def _closest_orthonormal(m: Tensor) -> Tensor:
    """``P Qᴴ`` from ``m = P S Qᴴ``: the matrix with orthonormal columns closest to ``m`` (polar factor)."""
    p, _, qh = _svd(m)
    return p @ qh


def tsv_pieces(tv: Tensor) -> Tensor:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025) on
    one matrix, as ``[T, m, n]`` per-task pieces whose sum is the TSV-M merge ``Δ``.

    Each task vector ``τ_t = U_t S_t V_tᵀ`` keeps its top ``k = ⌊min(m, n) / T⌋`` singular triplets; the kept
    ``U = [U_1,k … U_T,k]`` and ``Vᵀ = [V_1,kᵀ; …; V_T,kᵀ]`` are replaced by their closest orthonormal matrices
    ``U⊥``, ``V⊥ᵀ`` (decorrelating the tasks' subspaces), and ``Δ = U⊥ diag(S_1,k … S_T,k) V⊥ᵀ``. Piece ``t`` is
    task ``t``'s block of that product. A matrix with fewer singular values than tasks (``k = 0``) takes the mean
    of the task vectors. Singular triplets at numerical zero (``s ≤ max s · max(m, n) · eps``: a low-rank task
    vector such as a LoRA adapter's, or a task that leaves the matrix unchanged) are dropped before the
    orthonormalisation: their directions are arbitrary and would otherwise rotate the other tasks' kept ones; full
    fine-tunes keep all ``k``. Computed in float32; returned in ``tv``'s dtype.
    """
    T, m, n = tv.shape
    k = min(m, n) // T
    if k == 0:  # fewer singular values than tasks (e.g. BERT's 2-row token-type embeddings): the mean, as non-matrices
        return tv / T
    us, ss, vhs = [], [], []
    for t in range(T):
        u, s, vh = _svd(tv[t].float())
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    top = max(float(s[0]) if s.numel() else 0.0 for s in ss)
    if top == 0.0:
        return torch.zeros_like(tv)
    tol = top * max(m, n) * torch.finfo(torch.float32).eps
    keep = [s > tol for s in ss]
    us = [u[:, kept] for u, kept in zip(us, keep, strict=True)]
    vhs = [vh[kept] for vh, kept in zip(vhs, keep, strict=True)]
    ss = [s[kept] for s, kept in zip(ss, keep, strict=True)]
    u_perp = _closest_orthonormal(torch.cat(us, dim=1))
    vh_perp = _closest_orthonormal(torch.cat(vhs, dim=0))  # orthonormal rows
    ends = torch.tensor([0, *(len(s) for s in ss)]).cumsum(0).tolist()
    out = torch.stack(
        [u_perp[:, a:b] @ (s[:, None] * vh_perp[a:b]) for a, b, s in zip(ends[:-1], ends[1:], ss, strict=True)]
    )
    return out.to(tv.dtype)


def iso_c_pieces(tv: Tensor) -> Tensor:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025) on one matrix, as ``[T, m, n]`` per-task pieces whose sum is the Iso-C merge
    ``Δ = σ̄ U Vᵀ``, where ``U S Vᵀ`` is the SVD of the Task Arithmetic sum ``Σ_t τ_t`` and ``σ̄`` the mean of its
    singular values (a flat spectrum: every direction of the common subspace gets the same weight).

    The common subspace is the sum's numerical rank (``σ_j > max σ · max(m, n) · eps``). On a full-rank sum that is
    every direction, as published. On a rank-deficient one (LoRA adapters: rank ≤ T·r; rows no task changed) the
    published formula would count the zero singular values in ``σ̄`` and give ``σ̄`` to null directions the SVD
    picks arbitrarily: the merge shrinks towards the base and gains noise. Here ``σ̄`` is the mean of the nonzero
    singular values and the null space gets nothing.

    Split: ``Δ = U diag(σ̄/σ_j) Uᵀ Σ_t τ_t`` over the kept directions, so piece ``t`` is ``U diag(σ̄/σ_j) Uᵀ τ_t``.
    Computed in float32; returned in ``tv``'s dtype.
    """
    x = tv.float()
    u, s, _ = _svd(x.sum(0))
    if not s.numel() or float(s.max()) == 0.0:
        return torch.zeros_like(tv)
    keep = s > s.max() * max(x.shape[1:]) * torch.finfo(torch.float32).eps
    uk, sk = u[:, keep], s[keep]
    scale = sk.mean() / sk
    return (uk @ (scale[:, None] * (uk.T @ x))).to(tv.dtype)  # [T, m, n]


SUBSPACE_METHODS = {"tsv": tsv_pieces, "iso_c": iso_c_pieces}


def subspace_pieces(task_vectors: Mapping[str, Tensor], kind: str, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Per-task pieces of the TSV-M (``kind="tsv"``) or Iso-C (``"iso_c"``) merge for stacked task vectors
    ``{name: [T, ...]}``: ``Σ_t pieces[name][t]`` is that method's merged update of the tensor. Matrices go through
    :func:`tsv_pieces` / :func:`iso_c_pieces`; other tensors (biases, norms, convolutions) and matrices whose name
    contains one of ``skip`` (e.g. the token embeddings) take the papers' mean of the task vectors, ``τ_t / T``."""
    if kind not in SUBSPACE_METHODS:
        raise ValueError(f"kind must be one of {sorted(SUBSPACE_METHODS)}, got {kind!r}")
    fn = SUBSPACE_METHODS[kind]
    out = {}
    for name, tv in task_vectors.items():
        if tv.ndim == 3 and not any(s in name for s in skip):
            out[name] = fn(tv)
        else:
            out[name] = tv / tv.shape[0]
    return out
