"""``image_cls``: any ``AutoModelForImageClassification`` fine-tune (ViT, MobileNetV2, ResNet, ConvNeXt, Swin, …: the
families tested are ``tests/test_vision.py``'s ``IMAGE_FAMILIES``, listed in the README). The backbone
(``base_model_prefix``) is merged; each task keeps its own frozen classifier, as for text. Inputs are ``pixel_values``
from the base's image processor. Exports: the merged backbone loads with ``AutoModel``, and ``tasks/<task>/`` with
``AutoModelForImageClassification``.

BatchNorm: only parameters are merged. A backbone's BatchNorm running statistics are buffers, which would stay the
base's; before export they are re-estimated on unlabeled data of every task (``export.bn_batches`` steps, see
:func:`adamerge.core.batchnorm.recalibrate_batchnorm`), since the merged weights change every layer's input statistics.
For the same reason a training step normalises the merge with its batch's statistics
(:meth:`adamerge.methods.MergeModule.training_batchnorm`), and the experts run with their own fine-tune's buffers.
With ``batchnorm_statistics: task`` each task's rows are normalised apart and each task gets statistics of its own
(``task_buffers.safetensors``, ``tasks/<task>/``; :meth:`adamerge.methods.MergeModule.recalibrate_batchnorm`).
"""

from __future__ import annotations

import torch
from torch import nn

from adamerge.kinds.headed import HeadedKind


class ImageClassification(HeadedKind):
    name = "image_cls"
    modality = "image"
    auto_class_name = "AutoModelForImageClassification"
    pipeline_tag = "image-classification"

    @torch.no_grad()
    def feature_dim(self, backbone: nn.Module) -> int:
        """CNNs have no ``hidden_size``: the width of the feature field on one blank image (of the config's
        ``image_size``; 224 where the config has none, as ResNet's and RegNet's); the channels of a ``[n, C, H, W]``
        feature (ResNet's pooled ``[n, C, 1, 1]``), else its last axis."""
        from adamerge.core.modules import eval_mode

        cfg = backbone.config
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        with eval_mode(backbone):
            out = backbone(pixel_values=torch.zeros(1, getattr(cfg, "num_channels", 3), size, size))
        feats = getattr(out, self.feature_field(out))
        return feats.shape[1] if feats.ndim == 4 else feats.shape[-1]
