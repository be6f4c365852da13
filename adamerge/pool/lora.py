"""PEFT LoRA adapters as task vectors: read an adapter's factors, stack them over tasks."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adamerge.errors import MergeInputError
from adamerge.io.sources import read_state_dict


@dataclass
class LoraDelta:
    """One adapter read as backbone deltas: low-rank factors, dense tensors (saved modules), and head tensors."""

    factors: dict[str, tuple[Tensor, Tensor]]  # name -> (B [out, r] with the scale folded in, A [r, in])
    dense: dict[str, Tensor]  # backbone tensors the adapter saves in full (modules_to_save): the full new value
    head: dict[str, Tensor]  # head tensors (kinds with per-task heads), relative to the head shell
    state: dict[str, Tensor]  # the adapter's raw tensors (for hashing)


def _adapter_tensors(path: Path) -> dict[str, Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return read_state_dict(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise MergeInputError(f"LoRA adapter {path}: no adapter_model.safetensors or adapter_model.bin")


def read_lora(source: str, prefix: str, backbone_names: set[str]) -> LoraDelta:
    """Read a PEFT LoRA adapter into backbone deltas (``prefix``: the backbone's attribute, '' when the model is
    merged whole)."""
    path = Path(source)
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeInputError(f"adapter {source}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    if cfg.get("use_dora"):
        raise MergeInputError(f"adapter {source}: DoRA adapters are not supported (use_dora: true)")
    raw = _adapter_tensors(path)
    alpha, alpha_pattern = cfg.get("lora_alpha", 8), cfg.get("alpha_pattern") or {}
    rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))

    def rel(key: str) -> str:
        key = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        return key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else ("" if prefix else key)

    factors, dense, head = {}, {}, {}
    for key, t in raw.items():
        for a_tag, b_tag, transposed in (
            (".lora_A.", ".lora_B.", fan_in_fan_out),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if a_tag in key:
                module = key.split(a_tag)[0]
                b_key = key.replace(a_tag, b_tag)
                if b_key not in raw:
                    raise MergeInputError(f"adapter {source}: {key!r} has no matching {b_key!r}")
                name = rel(module + ".weight")
                if name not in backbone_names:
                    raise MergeInputError(f"adapter {source}: targets {module!r}, which is not a backbone weight")
                A, B = t.float(), raw[b_key].float()
                r = A.shape[0]
                a = next((v for k, v in alpha_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), alpha)
                scale = a / math.sqrt(r) if rslora else a / r
                factors[name] = (A.T * scale, B.T) if transposed else (B * scale, A)
        if "lora_" in key:
            continue
        name = rel(key)
        if name and name in backbone_names:
            dense[name] = t
        else:
            head[key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")] = t
    if not factors and not dense:
        raise MergeInputError(f"adapter {source}: no LoRA tensors found")
    return LoraDelta(factors, dense, head, raw)


def _stack_low_rank(per_task: list[tuple[Tensor, Tensor] | None], dtype) -> tuple[Tensor, Tensor]:
    """Stack (B, A) factors of T tasks, zero-padding ranks (and tasks without this tensor) to the largest rank."""
    ref = next(f for f in per_task if f is not None)
    out_dim, in_dim = ref[0].shape[0], ref[1].shape[1]
    r = max(f[0].shape[1] for f in per_task if f is not None)
    B = torch.zeros(len(per_task), out_dim, r, dtype=dtype)
    A = torch.zeros(len(per_task), r, in_dim, dtype=dtype)
    for t, f in enumerate(per_task):
        if f is not None:
            B[t, :, : f[0].shape[1]] = f[0]
            A[t, : f[1].shape[0]] = f[1]
    return B, A
