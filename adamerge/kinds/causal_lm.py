"""``causal_lm``: ``*ForCausalLM`` models. The whole model, LM head included, is merged; there are no per-task heads
and the merged model's own logits are every task's. Exports load with ``AutoModelForCausalLM``."""

from __future__ import annotations

import torch
from torch import nn

from adamerge.errors import MergeInputError
from adamerge.kinds.base import ModelKind
from adamerge.kinds.headed import is_safetensors_file, read_state_dict


class CausalLM(ModelKind):
    name = "causal_lm"
    per_task_heads = False
    modality = "text"
    peft_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    evaluated_on = "tokens"

    def load(self, source: str, base_config=None, trust_remote_code: bool = False,
             dtype: torch.dtype = torch.float32, role: str = "fine-tune") -> nn.Module:
        from transformers import AutoModelForCausalLM

        if is_safetensors_file(source):
            if base_config is None:
                raise MergeInputError(f"{source}: a bare safetensors file needs the base model's config")
            model = AutoModelForCausalLM.from_config(base_config)
            missing, extra = model.load_state_dict(read_state_dict(source), strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if missing or extra:
                raise MergeInputError(f"{source}: state dict does not match {type(model).__name__}: missing keys "
                                      f"{missing[:5]}, unexpected keys {extra[:5]}")
            return model.to(dtype)
        try:
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        except Exception as e:  # transformers/safetensors raise many types
            raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e

    def split(self, model: nn.Module):
        return model, None

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return model

    def head_logits(self, head, features, inputs):
        return features.logits

    def check_features(self) -> None:
        raise MergeInputError("objective: 'features' needs a backbone with hidden features; a causal LM is merged "
                              "whole (use objective 'kl' or 'pseudo_label')")

    def feature_field(self, output) -> str:
        self.check_features()

    def load_backbone(self, root, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(root), dtype=dtype)

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n```\n")
