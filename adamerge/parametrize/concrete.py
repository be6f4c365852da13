"""Concrete (relaxed Bernoulli) subspace masks over task vectors (Tang et al. 2023).

One logit ``s`` per task-vector element, shared by all tasks, initialised to 0. A relaxed sample with temperature τ:

    u ~ U(0, 1),   m = sigmoid((s + log u − log(1 − u)) / τ)

and each masked task vector is rescaled per tensor by ``1 / mean(m)``, so the merge uses ``m ⊙ τ_t / mean(m)``.
With ``tasks=T`` (ours, not in the paper) every task has its own logits ``s_t`` and mask ``m_t``, rescaled by its own
mean: the merge uses ``m_t ⊙ τ_t / mean(m_t)``, one body still, but an entry can keep one task's update and drop
another's (a shared mask can only keep or drop all of them).
At export the mask is made deterministic: ``m = 1[s ≥ 0]`` (threshold; elements training never touched stay in), a
seeded Bernoulli draw with ``p = sigmoid(s)``, one seeded relaxed sample (``continuous``, FusionBench's evaluation) or
``sigmoid(s)`` itself (``expected``); the manifest records which. As ``s → +∞`` the mask is all ones and the method
reduces exactly to
plain Task Arithmetic / AdaMerging.

Memory: the logits are as large as one model's masked tensors (T times that with ``tasks``; plus Adam's two
moments); ``dtype="bfloat16"`` halves them, and ``include`` (a regular expression on tensor names) masks only the
selected tensors.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError


def _key(name: str) -> str:
    return name.replace(".", "__")


class ConcreteMask(nn.Module):
    """Learnable mask logits for the tensors whose name matches ``include``.

    Args:
        shapes: tensor name → shape (of one task vector, without the task axis).
        temperature: relaxation temperature τ (0.5 in the paper).
        init: initial logit value.
        include: regular expression; only matching tensor names get a mask (``None``: all).
        dtype: storage dtype of the logits.
        tasks: 0 for one mask shared by every task (the paper); T for one mask per task (logits ``[T, *shape]``,
            each task's mask rescaled by its own mean).
    """

    def __init__(
        self,
        shapes: dict[str, torch.Size],
        temperature: float = 0.5,
        init: float = 0.0,
        include: str | None = None,
        dtype: torch.dtype = torch.float32,
        tasks: int = 0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise MergeInputError(f"temperature must be > 0, got {temperature}")
        pattern = re.compile(include) if include else None
        self.names = [n for n in shapes if pattern is None or pattern.search(n)]
        if not self.names:
            raise MergeInputError(f"include: pattern {include!r} matches no tensor")
        if tasks < 0:
            raise MergeInputError(f"tasks must be >= 0 (0: one shared mask), got {tasks}")
        self.temperature, self.tasks = temperature, tasks
        lead = (tasks,) if tasks else ()
        self.logits = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full(lead + tuple(shapes[n]), float(init), dtype=dtype)) for n in self.names}
        )

    def logit(self, name: str) -> Tensor:
        return self.logits[_key(name)]

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on the logits' device (training draws; the export draws on the CPU)."""
        return torch.Generator(device=next(iter(self.logits.values())).device).manual_seed(seed)

    def rescale(self, mask: Tensor) -> Tensor:
        """``mask / mean(mask)``: over the whole tensor, or over each task's slice with per-task masks (a slice
        that is all zeros stays zeros)."""
        if not self.tasks:
            return mask / mask.mean().clamp_min(1e-12)
        mean = mask.reshape(mask.shape[0], -1).mean(1).clamp_min(1e-12)
        return mask / mean.view(-1, *[1] * (mask.dim() - 1))

    def sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A relaxed, rescaled mask per tensor (differentiable in the logits)."""
        out = {}
        for n in self.names:
            s = self.logit(n).float()
            u = _uniform(s, generator).clamp(1e-6, 1 - 1e-6)
            m = torch.sigmoid((s + torch.log(u) - torch.log1p(-u)) / self.temperature)
            out[n] = self.rescale(m)
        return out

    MODES = ("threshold", "sample", "continuous", "expected")

    @classmethod
    def check_mode(cls, mode: str) -> None:
        """Refuse an unknown export mask mode (called before any model is loaded, and by :meth:`hard`)."""
        if mode not in cls.MODES:
            raise MergeInputError(f"export_mask: unknown value {mode!r}; allowed: {', '.join(cls.MODES)}")

    @torch.no_grad()
    def hard(self, mode: str = "threshold", seed: int = 0) -> dict[str, Tensor]:
        """A deterministic export mask (rescaled by its mean): ``threshold`` keeps ``s ≥ 0``; ``sample`` draws
        Bernoulli(sigmoid(s)) with ``seed``; ``continuous`` is one relaxed sample drawn with ``seed`` (what
        FusionBench evaluates); ``expected`` is the mean of the relaxation's Bernoulli, ``sigmoid(s)`` (no draw)."""
        self.check_mode(mode)
        if mode == "continuous":
            return {n: m.detach() for n, m in self.sample(torch.Generator().manual_seed(seed)).items()}
        g = torch.Generator().manual_seed(seed)
        out = {}
        for n in self.names:
            s = self.logit(n).float()
            if mode == "threshold":
                m = (s >= 0).float()
            elif mode == "expected":
                m = torch.sigmoid(s)
            else:
                m = (torch.rand(s.shape, generator=g).to(s.device) < torch.sigmoid(s)).float()
            out[n] = self.rescale(m)
        return out


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) noise shaped like ``like`` on its device, drawn on the generator's device (a CPU generator gives the
    same draw whatever device the mask lives on)."""
    device = like.device if generator is None else generator.device
    return torch.rand(like.shape, generator=generator, device=device).to(like.device)
