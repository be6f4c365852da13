"""Small torch.distributed helpers: a DTensor's full value and a differentiable sum over ranks."""

from __future__ import annotations

import torch
from torch import Tensor


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
