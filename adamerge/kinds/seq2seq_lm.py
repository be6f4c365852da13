"""``seq2seq_lm``: ``*ForConditionalGeneration`` encoder-decoders (T5 / Flan-T5, BART, mT5, …), as FusionBench
merges Flan-T5 fine-tunes on text-to-text tasks. The whole model, LM head included, is merged; there are no per-task
heads. Unlabeled rows are inputs only, so the logits the objectives and the label-free selector read are the merged
model's distribution over the **first output token** (the decoder fed its start token alone): the answer's first
token of a text-to-text classification task. Exports load with ``AutoModelForSeq2SeqLM`` and generate as usual."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.kinds.base import ModelKind
from adamerge.kinds.headed import is_safetensors_file, read_state_dict


def _first_decoder_position(model: nn.Module, args, kwargs):
    """Forward pre-hook: without ``decoder_input_ids`` (or embeddings, or labels), the decoder reads its start token
    alone, so the logits are ``[B, 1, V]``, the first output token's distribution."""
    if any(kwargs.get(k) is not None for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")):
        return None
    ref = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if ref is None:
        return None
    start = torch.full((ref.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long, device=ref.device)
    return args, {**kwargs, "decoder_input_ids": start}


def first_token_logits(model: nn.Module) -> nn.Module:
    """``model`` (in place), called without decoder inputs, gives its first output token's logits."""
    model.register_forward_pre_hook(_first_decoder_position, with_kwargs=True)
    return model


class Seq2SeqLM(ModelKind):
    name = "seq2seq_lm"
    per_task_heads = False
    modality = "text"
    peft_task_type = "SEQ_2_SEQ_LM"
    pipeline_tag = "text2text-generation"
    evaluated_on = None  # no labels to score the first token against, no target text for token scores

    def load(self, source: str, base_config=None, trust_remote_code: bool = False,
             dtype: torch.dtype = torch.float32, role: str = "fine-tune") -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        if is_safetensors_file(source):
            if base_config is None:
                raise MergeInputError(f"{source}: a bare safetensors file needs the base model's config")
            model = AutoModelForSeq2SeqLM.from_config(base_config)
            missing, extra = model.load_state_dict(read_state_dict(source), strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            tied_names = ("lm_head.weight", "embed_tokens.weight")  # tied to the shared embedding when saved
            missing = [k for k in missing if k not in tied and not k.endswith(tied_names)]
            if missing or extra:
                raise MergeInputError(f"{source}: state dict does not match {type(model).__name__}: missing keys "
                                      f"{missing[:5]}, unexpected keys {extra[:5]}")
            return model.to(dtype)
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        except Exception as e:  # transformers/safetensors raise many types
            raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e
        if model.config.decoder_start_token_id is None:
            raise MergeInputError(f"{source}: its config has no decoder_start_token_id, so the first output token "
                                  "the merge is trained on cannot be decoded; set it in config.json")
        return model

    def split(self, model: nn.Module):
        return first_token_logits(model), None

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return model

    def head_logits(self, head, features, inputs):
        return features.logits

    def token_mask(self, inputs) -> Tensor | None:
        return None  # one decoder position per row: the encoder's attention mask does not index the logits

    def check_features(self) -> None:
        raise MergeInputError("objective: 'features' needs a backbone with hidden features; a seq2seq LM is merged "
                              "whole (use objective 'kl' or 'pseudo_label')")

    def feature_field(self, output) -> str:
        self.check_features()

    def load_backbone(self, root, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return first_token_logits(AutoModelForSeq2SeqLM.from_pretrained(str(root), dtype=dtype))

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        return ("```python\nfrom transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
                f"model = AutoModelForSeq2SeqLM.from_pretrained(\"{repo}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")\n"
                "answer = model.generate(**tokenizer([\"...\"], return_tensors=\"pt\"), max_new_tokens=8)\n```\n")
