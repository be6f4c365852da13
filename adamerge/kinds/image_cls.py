"""``image_cls``: any ``AutoModelForImageClassification`` fine-tune (ViT, ConvNeXt, MobileNetV2, ...). The backbone
(``base_model_prefix``) is merged; each task keeps its own frozen classifier, as for text. Inputs are
``pixel_values`` from the base's image processor. Exports: the merged backbone loads with ``AutoModel``, and
``tasks/<task>/`` with ``AutoModelForImageClassification``.

BatchNorm: only parameters are merged. A backbone's BatchNorm running statistics are buffers, which would stay the
base's; before export they are re-estimated on unlabeled data of every task (``export.bn_batches`` steps, see
:func:`adamerge.merged.recalibrate_batchnorm`), since the merged weights change every layer's input statistics.
"""

from __future__ import annotations

from adamerge.kinds.headed import HeadedKind


class ImageClassification(HeadedKind):
    name = "image_cls"
    modality = "image"
    auto_class_name = "AutoModelForImageClassification"
    pipeline_tag = "image-classification"
