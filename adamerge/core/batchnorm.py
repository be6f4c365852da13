"""BatchNorm helpers on plain modules: batch statistics in a block, summed over ranks, and re-estimation of running
statistics under merged weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.core.functional import summed_batch_norm


@contextmanager
def batch_statistics(module: nn.Module, total: Callable[[Tensor], Tensor] | None = None):
    """Inside the block every BatchNorm layer of ``module`` (that keeps running statistics) normalises with the
    statistics of the batch it is given and updates no buffer; afterwards each layer is as it was.

    ``total``: a differentiable sum over the data-parallel ranks (``MergeModule.data_parallel_sum``). With it the
    statistics are those of every rank's rows together (:func:`adamerge.core.functional.summed_batch_norm`), so that a
    step split over N processes normalises — and trains — as the whole step does in one."""
    layers = batchnorm_layers(module)
    saved = {n: (m.training, m.track_running_stats, m.__dict__.get("forward")) for n, m in layers.items()}
    try:
        for m in layers.values():
            m.training, m.track_running_stats = True, False
            if total is not None:  # an instance attribute, removed below: the class's forward is untouched
                m.forward = partial(_summed_batchnorm_forward, m, total)
        yield module
    finally:
        for n, m in layers.items():
            m.training, m.track_running_stats, forward = saved[n]
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


def _summed_batchnorm_forward(layer: nn.modules.batchnorm._BatchNorm, total, x: Tensor) -> Tensor:
    layer._check_input_dim(x)
    return summed_batch_norm(x, layer.weight, layer.bias, layer.eps, total)


def batchnorm_layers(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        n: m
        for n, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@torch.no_grad()
def recalibrate_batchnorm(
    backbone: nn.Module, params: Mapping[str, Tensor], batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``backbone`` run with the merged
    ``params`` over ``batches`` of inputs (a cumulative average over all of them, as ``momentum=None`` does), and
    return the new buffers by name. The backbone's own buffers are left as they were."""
    layers = batchnorm_layers(backbone)
    if not layers:
        return {}
    saved = {
        n: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.training)
        for n, m in layers.items()
    }
    try:
        for m in layers.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        for inputs in batches:
            functional_call(backbone, dict(params), args=(), kwargs=dict(inputs))
        out = {}
        for n, m in layers.items():
            out[f"{n}.running_mean"] = m.running_mean.clone()
            out[f"{n}.running_var"] = m.running_var.clone()
            out[f"{n}.num_batches_tracked"] = m.num_batches_tracked.clone()
        return out
    finally:
        for n, m in layers.items():
            momentum, mean, var, count, training = saved[n]
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.train(training)
