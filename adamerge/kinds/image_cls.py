"""``image_cls``: any ``AutoModelForImageClassification`` fine-tune (ViT, ConvNeXt, MobileNetV2, ...). The backbone
(``base_model_prefix``) is merged; each task keeps its own frozen classifier, as for text. Inputs are
``pixel_values`` from the base's image processor. Exports: the merged backbone loads with ``AutoModel``, and
``tasks/<task>/`` with ``AutoModelForImageClassification``.

BatchNorm: only parameters are merged. A backbone's BatchNorm running statistics are buffers; the merge keeps the
base's, and ``bn_recalibration`` (see :func:`adamerge.kinds.image_cls.recalibrate_batchnorm`) re-estimates them on
the unlabeled data of every task before export.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.kinds.headed import HeadedKind


class ImageClassification(HeadedKind):
    name = "image_cls"
    modality = "image"
    auto_class_name = "AutoModelForImageClassification"
    pipeline_tag = "image-classification"


def batchnorm_layers(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats}


@torch.no_grad()
def recalibrate_batchnorm(backbone: nn.Module, params: Mapping[str, Tensor], batches: Iterable[Mapping[str, Tensor]]
                          ) -> dict[str, Tensor]:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``backbone`` run with the merged
    ``params`` over ``batches`` of inputs (a cumulative average over all of them, as ``momentum=None`` does), and
    return the new buffers by name. The backbone's own buffers are left as they were."""
    layers = batchnorm_layers(backbone)
    if not layers:
        return {}
    saved = {n: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.training)
             for n, m in layers.items()}
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
