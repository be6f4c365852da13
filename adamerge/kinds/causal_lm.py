"""``causal_lm``: ``*ForCausalLM`` models. The whole model, LM head included, is merged; there are no per-task heads
and the merged model's own logits are every task's. Exports load with ``AutoModelForCausalLM``."""

from __future__ import annotations

from adamerge.kinds.whole import WholeModelKind


class CausalLM(WholeModelKind):
    name = "causal_lm"
    modality = "text"
    peft_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    evaluated_on = "tokens"
    auto_class_name = "AutoModelForCausalLM"
    described_as = "a causal LM"

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        return (
            "```python\nfrom transformers import AutoModelForCausalLM\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n```\n'
        )
