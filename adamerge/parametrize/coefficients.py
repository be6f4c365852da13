"""Merge coefficients λ at task or layer granularity.

``task``: one scalar per task, ``λ ∈ R^T``, shared by every tensor.
``layer``: one scalar per task and parameter tensor (weights and biases separately), ``λ ∈ R^{T×P}``.
:meth:`Coefficients.matrix` always returns the ``[T, P]`` view used by the merge.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError

GRANULARITIES = ("task", "layer")


class Coefficients(nn.Module):
    """Learnable (or fixed) merge coefficients.

    Args:
        num_tasks: T.
        num_tensors: P, the number of merged parameter tensors.
        granularity: ``"task"`` (T scalars) or ``"layer"`` (T × P scalars).
        init: initial value of every coefficient, or a ``[T]``/``[T, P]`` tensor.
        clamp: clamp the values used in the merge to ``[0, 1]`` (the original AdaMerging code does; FusionBench
            does not).
    """

    def __init__(
        self,
        num_tasks: int,
        num_tensors: int,
        granularity: str = "layer",
        init: float | Tensor = 0.3,
        clamp: bool = False,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise MergeInputError(f"granularity: unknown value {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        self.num_tensors = num_tensors
        self.clamp = clamp
        shape = (num_tasks,) if granularity == "task" else (num_tasks, num_tensors)
        value = torch.as_tensor(init, dtype=torch.float32)
        if value.ndim == 1 and len(shape) == 2:
            value = value[:, None]
        self.weight = nn.Parameter(value.expand(shape).clone())

    def matrix(self) -> Tensor:
        """Coefficients as ``[T, P]`` (clamped if requested)."""
        w = self.weight.clamp(0.0, 1.0) if self.clamp else self.weight
        return w[:, None].expand(-1, self.num_tensors) if self.granularity == "task" else w

    def forward(self) -> Tensor:
        """:meth:`matrix` as a forward (so FSDP2 gathers a sharded ``weight`` around it)."""
        return self.matrix()
