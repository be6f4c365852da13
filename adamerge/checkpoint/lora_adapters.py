"""Export a merge of LoRA adapters as PEFT LoRA adapters (it stays low-rank).

With LoRA task vectors ``ΔW_t = B_t A_t`` (scale folded into ``B_t``) and coefficients ``λ_{t,p}``, the merged delta
of tensor p is ``Σ_t λ_{t,p} B_t A_t = [λ_1 B_1 … λ_T B_T] · [A_1; …; A_T]``: a LoRA of rank ``T·r`` with
``lora_alpha = T·r`` (scale 1). One adapter per task is written (the backbone delta is shared, the classifier head is
the task's own), each loadable with ``peft.PeftModel.from_pretrained(base_model, path)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adamerge.errors import MergeInputError


def write_lora_adapters(module, root: Path) -> list[str]:
    """Write ``root/adapters/<task>/`` for every task of ``module`` (a MergeModule over LoRA adapters)."""
    from peft import LoraConfig, get_peft_model

    merged = module.merged
    if merged.kind.peft_task_type is None:
        raise MergeInputError(
            f"lora_adapters: PEFT adapters are written for task_type seq_cls, causal_lm and "
            f"seq2seq_lm, not {merged.kind.name!r}; export the full merged model "
            "(lora_adapters: false)"
        )
    if not merged.low_rank_names or merged.task_vectors():
        raise MergeInputError(
            "export_lora: every merged tensor must have a low-rank (LoRA) task vector; "
            f"dense ones: {list(merged.task_vectors())[:5]}"
        )
    modules = dict(merged.backbone.named_modules())
    for name in merged.low_rank_names:
        owner = modules.get(name.rsplit(".", 1)[0])
        if not isinstance(owner, nn.Linear) or not name.endswith(".weight"):
            raise MergeInputError(f"export_lora: {name!r} is not an nn.Linear weight; export the full model instead")
    lam = merged.coefficients.matrix().detach()
    index = {n: p for p, n in enumerate(merged.param_names)}
    factors = {}
    for name in merged.low_rank_names:
        B, A = merged.low_rank_factors(name)
        T, out_dim, r = B.shape
        left = (B.float() * lam[:, index[name], None, None].float()).permute(1, 0, 2).reshape(out_dim, T * r)
        factors[name.rsplit(".", 1)[0]] = (left, A.float().reshape(T * r, -1))
    rank = next(iter(factors.values()))[1].shape[0]
    written = []
    for task in merged.task_names:
        peft_task, save, targets = merged.kind.peft_task_type, None, list(factors)
        if not merged.kind.per_task_heads:  # the whole model is the backbone
            model = type(merged.backbone)._from_config(merged.backbone.config)  # its own class: causal or seq2seq
            model.load_state_dict(merged.backbone.state_dict(), strict=False)
            prefix = ""
        else:
            head = merged.heads[task]
            model = _classifier_with(merged.kind, head, merged.backbone)
            prefix = head.base_model_prefix + "."
            own = sorted({k.split(".")[1] for k in head.state_dict() if k.startswith(prefix)})  # e.g. its pooler
            if own:  # the head's own modules are saved whole (the task's values), not the backbone's merge of them
                save = [prefix + m for m in own]
                targets = [m for m in factors if m.split(".")[0] not in own]
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=[prefix + m for m in targets],
            lora_dropout=0.0,
            task_type=peft_task,
            modules_to_save=save,
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, config)
        named = dict(peft_model.base_model.model.named_modules())
        with torch.no_grad():
            for m in targets:
                left, right = factors[m]
                lora = named[prefix + m]
                lora.lora_A["default"].weight.copy_(right)
                lora.lora_B["default"].weight.copy_(left)
        target = root / "adapters" / task
        peft_model.save_pretrained(str(target))
        written.append(str(target))
    return written


def _classifier_with(kind, head: nn.Module, backbone: nn.Module) -> nn.Module:
    """A full ``*For<Task>`` model from a head shell and the base backbone (for PEFT to wrap)."""
    model = kind.auto_class().from_config(head.config)
    state = {f"{model.base_model_prefix}.{k}": v for k, v in backbone.state_dict().items()}
    state.update(head.state_dict())
    model.load_state_dict(state, strict=False)
    return model
