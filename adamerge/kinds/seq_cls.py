"""``seq_cls``: ``*ForSequenceClassification`` models. The backbone (``base_model_prefix``) is merged; each task keeps
its own frozen classification head (the rest of the model). Exports: the merged encoder loads with ``AutoModel``, and
``tasks/<task>/`` with ``AutoModelForSequenceClassification``."""

from __future__ import annotations

from adamerge.kinds.headed import HeadedKind


class SequenceClassification(HeadedKind):
    name = "seq_cls"
    modality = "text"
    peft_task_type = "SEQ_CLS"
    auto_class_name = "AutoModelForSequenceClassification"
