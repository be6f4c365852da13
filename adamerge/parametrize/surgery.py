"""Representation Surgery adapters (Yang et al. 2024).

Per task t, on the merged encoder's final feature ``z ∈ R^d``::

    ẑ = z − U_t ReLU(D_t z),   D_t: d → r,  U_t: r → d,  no bias,  U_t = 0 at init (so ẑ = z at start)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from adamerge.io.extensions import ExportExtension, NoHook, register_extension

ADAPTERS = "surgery_adapters.safetensors"


class SurgeryAdapter(nn.Module):
    """One task's low-rank feature correction ``z − U ReLU(D z)``.

    Args:
        dim: feature size d.
        rank: bottleneck r (16 in the paper).
    """

    def __init__(self, dim: int, rank: int = 16) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim == 4:  # a CNN's [n, C, H, W] feature map (ResNet's pooled one is [n, C, 1, 1]): along the channels
            return z - self.up(torch.relu(self.down(z.movedim(1, -1)))).movedim(-1, 1)
        return z - self.up(torch.relu(self.down(z)))


def feature_field(output, feature: str) -> str:
    if feature != "auto":
        return feature
    return "pooler_output" if getattr(output, "pooler_output", None) is not None else "last_hidden_state"


def replace_field(output, name: str, value: Tensor):
    return type(output)(**{k: (value if k == name else v) for k, v in output.items()})


class SurgeryHook(NoHook):
    """Serves an export's Surgery adapters: each task's feature corrected by its own adapter."""

    def __init__(self, adapters: dict[str, SurgeryAdapter], feature: str) -> None:
        super().__init__()
        self.adapters, self.feature = nn.ModuleDict(adapters), feature

    def features(self, task: str, features):
        if task not in self.adapters:
            return features
        field = feature_field(features, self.feature)
        return replace_field(features, field, self.adapters[task](features[field]))


def serve_surgery(path: Path, info: dict, backbone: nn.Module, dtype: torch.dtype) -> SurgeryHook:
    tensors = load_file(str(Path(path) / info["adapters"]))
    adapters = {}
    for task in sorted({k.split("/", 1)[0] for k in tensors}):
        down = tensors[f"{task}/down.weight"]
        a = SurgeryAdapter(down.shape[1], down.shape[0])
        a.load_state_dict({"down.weight": down, "up.weight": tensors[f"{task}/up.weight"]})
        adapters[task] = a.to(dtype).eval()
    return SurgeryHook(adapters, info["feature"])


SURGERY_EXPORT = register_extension(
    ExportExtension(
        key="surgery",
        module=__name__,
        serve=serve_surgery,
        card=lambda info: (
            "This export carries Representation Surgery adapters (`surgery_adapters.safetensors`), which "
            "stock `transformers` cannot run: serve it with `adamerge.load_merged(path)`.\n"
        ),
    )
)
