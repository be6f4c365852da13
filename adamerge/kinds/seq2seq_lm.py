"""``seq2seq_lm``: ``*ForConditionalGeneration`` encoder-decoders (T5 / Flan-T5, BART, mT5, …), as FusionBench
merges Flan-T5 fine-tunes on text-to-text tasks. The whole model, LM head included, is merged; there are no per-task
heads. Unlabeled rows are inputs only, so the logits the objectives and the label-free selector read are the merged
model's distribution over the **first output token** (the decoder fed its start token alone): the answer's first
token of a text-to-text classification task. Exports load with ``AutoModelForSeq2SeqLM`` and generate as usual."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.kinds.base import default_decoder_inputs
from adamerge.kinds.whole import WholeModelKind


def _start_token(model: nn.Module, kwargs):
    ref = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if ref is None:
        return None
    return torch.full((ref.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long, device=ref.device)


def first_token_logits(model: nn.Module) -> nn.Module:
    """``model`` (in place), called without decoder inputs, decodes its start token alone: its logits are
    ``[B, 1, V]``, the first output token's distribution."""
    return default_decoder_inputs(model, _start_token)


class Seq2SeqLM(WholeModelKind):
    name = "seq2seq_lm"
    modality = "text"
    peft_task_type = "SEQ_2_SEQ_LM"
    pipeline_tag = "text2text-generation"
    evaluated_on = "answers"  # the first output token among each class's answer word
    auto_class_name = "AutoModelForSeq2SeqLM"
    described_as = "a seq2seq LM"
    tied_suffixes = ("lm_head.weight", "embed_tokens.weight")  # tied to the shared embedding when saved

    def load(
        self,
        source: str,
        base_config=None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        role: str = "fine-tune",
    ) -> nn.Module:
        model = super().load(source, base_config, trust_remote_code, dtype, role)
        if model.config.decoder_start_token_id is None:
            raise MergeInputError(
                f"{source}: its config has no decoder_start_token_id, so the first output token "
                "the merge is trained on cannot be decoded; set it in config.json"
            )
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        return first_token_logits(model)

    def token_mask(self, inputs) -> Tensor | None:
        return None  # one decoder position per row: the encoder's attention mask does not index the logits

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        return (
            "```python\nfrom transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
            f'model = AutoModelForSeq2SeqLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
            'answer = model.generate(**tokenizer(["..."], return_tensors="pt"), max_new_tokens=8)\n```\n'
        )
