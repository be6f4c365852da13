"""Model kinds (``task_type``): one module each, one line each in :data:`KINDS`. See :mod:`adamerge.kinds.base`."""

from __future__ import annotations

from adamerge.errors import MergeInputError
from adamerge.kinds.base import FeatureStub, ModelKind, apply_head
from adamerge.kinds.causal_lm import CausalLM
from adamerge.kinds.clip import CLIP
from adamerge.kinds.image_cls import ImageClassification
from adamerge.kinds.seq2seq_lm import Seq2SeqLM
from adamerge.kinds.seq_cls import SequenceClassification

KINDS: dict[str, ModelKind] = {
    k.name: k for k in (SequenceClassification(), CausalLM(), ImageClassification(), CLIP(), Seq2SeqLM())
}


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise MergeInputError(f"task_type: unknown value {name!r}; allowed: {', '.join(KINDS)}")
    return KINDS[name]


__all__ = ["KINDS", "FeatureStub", "ModelKind", "apply_head", "get_kind"]
