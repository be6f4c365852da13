"""Representation Surgery adapters (Yang et al. 2024).

Per task t, on the merged encoder's final feature ``z ∈ R^d``::

    ẑ = z − U_t ReLU(D_t z),   D_t: d → r,  U_t: r → d,  no bias,  U_t = 0 at init (so ẑ = z at start)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
