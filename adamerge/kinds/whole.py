"""Shared by the kinds whose whole model is merged (causal LMs, seq2seq LMs): no per-task heads, the merged model's
own logits are every task's, and an export is one ``AutoModelFor<Task>`` checkpoint."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from adamerge.errors import MergeInputError
from adamerge.io.sources import is_safetensors_file, read_state_dict
from adamerge.kinds.base import ModelKind, refuse_fresh


class WholeModelKind(ModelKind):
    """A kind whose full model is ``auto_class_name`` and is merged whole, each loaded model passed through
    :meth:`prepare`."""

    per_task_heads = False
    described_as: ClassVar[str] = ""  # in error messages: "a causal LM"
    tied_suffixes: ClassVar[tuple[str, ...]] = ("lm_head.weight",)  # saved once, tied to the input embedding

    def load(
        self,
        source: str,
        base_config=None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        role: str = "fine-tune",
    ) -> nn.Module:
        cls = self.auto_class()
        if is_safetensors_file(source):
            if base_config is None:
                raise MergeInputError(f"{source}: a bare safetensors file needs the base model's config")
            model = cls.from_config(base_config)
            missing, extra = model.load_state_dict(read_state_dict(source), strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied and not k.endswith(self.tied_suffixes)]
            if missing or extra:
                raise MergeInputError(
                    f"{source}: state dict does not match {type(model).__name__}: missing keys "
                    f"{missing[:5]}, unexpected keys {extra[:5]}"
                )
            return model.to(dtype)
        try:
            model, info = cls.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        except Exception as e:  # transformers/safetensors raise many types
            raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e
        refuse_fresh(source, info, [], type(model).__name__)
        return model

    def split(self, model: nn.Module):
        return self.prepare(model), None

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return model

    def head_logits(self, head, features, inputs):
        return features.logits

    def check_features(self) -> None:
        raise MergeInputError(
            f"objective: 'features' needs a backbone with hidden features; {self.described_as} is "
            "merged whole (use objective 'kl' or 'pseudo_label')"
        )

    def feature_field(self, output) -> str:
        self.check_features()

    def load_backbone(self, root, dtype: torch.dtype) -> nn.Module:
        return self.prepare(self.auto_class().from_pretrained(str(root), dtype=dtype))
