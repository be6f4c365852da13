"""Data parallelism of a merge: the data-parallel process group of a step (for objectives' means over the global
batch) and FSDP2 sharding of the task-vector stores and coefficients under Lightning's ``ModelParallelStrategy``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from adamerge.core.distributed import all_sum
from adamerge.errors import MergeInputError


def data_parallel_mesh(device_mesh):
    """The data-parallel dimension of the device mesh ``ModelParallelStrategy`` sets (the whole mesh when it has no
    named one); None under other strategies."""
    if device_mesh is None:
        return None
    return device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh


def data_parallel_group(device_mesh):
    """The process group of the data-parallel ranks while a gradient is taken; None in one process, and where no
    gradient is taken (evaluation and label-free selection need not run on every rank)."""
    import torch.distributed as dist

    if not torch.is_grad_enabled() or not (dist.is_available() and dist.is_initialized()):
        return None
    mesh = data_parallel_mesh(device_mesh)
    group = dist.group.WORLD if mesh is None else mesh.get_group()
    return None if dist.get_world_size(group) == 1 else group


def data_parallel_sum(device_mesh) -> Callable[[Tensor], Tensor] | None:
    """A sum over the data-parallel ranks that carries the gradient, for objectives' means over the global batch
    (see :mod:`adamerge.objectives`); None where :func:`data_parallel_group` is."""
    group = data_parallel_group(device_mesh)
    return None if group is None else (lambda x: all_sum(x, group))


def shard_with_fsdp2(stores: Iterable[nn.Module], coefficients: nn.Module, device_mesh) -> None:
    """Shard every task-vector store and the coefficients with FSDP2 (``fully_shard``) over the data-parallel mesh:
    each rank holds 1/N of the task vectors, gathered one block at a time for the merge and again for the backward;
    coefficient gradients are averaged by FSDP2. Sparse stores (uneven, integer positions) stay replicated."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dp = data_parallel_mesh(device_mesh)
    n = dp.size()

    def largest_dim(p: Tensor) -> Shard:
        """Shard the largest axis that splits evenly (FSDP2 needs that off dim 0) rather than the short task axis,
        whose shards would be uneven; dim 0 otherwise."""
        even = [d for d in range(1, p.ndim) if p.shape[d] % n == 0]
        return Shard(max(even, key=lambda d: p.shape[d]) if even else 0)

    for store in stores:
        if not store.sparse_keys:
            fully_shard(store, mesh=dp, shard_placement_fn=largest_dim)
    fully_shard(coefficients, mesh=dp)


def check_shardable(module: nn.Module, method: str, offload: bool) -> None:
    """Refuse what FSDP2 sharding cannot hold: offloaded task vectors, trained tensors beyond the coefficients."""
    if offload:
        raise MergeInputError(
            "prep.offload streams task vectors from CPU memory; ModelParallelStrategy (FSDP2) "
            "shards them across devices instead: use one or the other"
        )
    others = sorted(
        n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("merged.coefficients.")
    )
    if others:
        raise MergeInputError(
            f"ModelParallelStrategy shards task vectors and coefficients only; method "
            f"{method!r} also trains {others[:3]}: use the DDP strategy"
        )
