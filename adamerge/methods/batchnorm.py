"""The BatchNorm policy of a merge: which statistics a training step normalises with, and the running statistics
re-estimated under the final merge for scoring and export. A no-op for backbones without BatchNorm layers.

Policies (``batchnorm_statistics``): ``batch`` (the default) — every BatchNorm layer normalises a training step with
the step's own batch statistics, as the exported merge will with statistics re-estimated on the same kind of rows;
``task`` — each task's rows with their own batch statistics (the backbone runs once per task under the one merge), as
each task's model in the export will with statistics re-estimated on that task's rows alone; ``running`` — the base's
running statistics, which no longer fit the merged weights. Under data parallelism the batch statistics are those of
every rank's rows together (a differentiable sum over the ranks per layer), so N processes train as one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.batchnorm import batch_statistics, batchnorm_layers, recalibrate_batchnorm
from adamerge.errors import MergeInputError

POLICIES = ("batch", "task", "running")


def task_slices(batch) -> list[tuple[str, slice]]:
    """``(task, rows)`` of every task in a step's batch (rows are contiguous per task)."""
    out, start = [], 0
    for task, n in zip(batch["tasks"], batch["sizes"]):
        out.append((task, slice(start, start + n)))
        start += n
    return out


def task_rows(batches: list[dict], task: str) -> list[dict]:
    """The rows of ``task`` in each step-shaped batch that has any, as batches of that task alone."""
    return [
        {"inputs": {k: v[sl] for k, v in b["inputs"].items()}, "tasks": [t], "sizes": [sl.stop - sl.start]}
        for b in batches
        for t, sl in task_slices(b)
        if t == task and sl.stop > sl.start
    ]


class BatchNormPolicy:
    """The BatchNorm statistics of one merge's backbone (see the module docstring).

    Args:
        backbone: the merge's backbone (its BatchNorm layers are found once).
        statistics: ``batch``, ``task`` or ``running``.
    """

    def __init__(self, backbone: nn.Module, statistics: str = "batch") -> None:
        if statistics not in POLICIES:
            raise MergeInputError(f"batchnorm_statistics: unknown value {statistics!r}; allowed: {', '.join(POLICIES)}")
        self.backbone, self.statistics = backbone, statistics
        self.present = bool(batchnorm_layers(backbone))
        self.stats: dict[str, Tensor] = {}  # re-estimated buffers of the merge (all rows)
        self.task_stats: dict[str, dict[str, Tensor]] = {}  # the same per task (``task``)
        self.info: dict[str, Any] | None = None  # the manifest's ``batchnorm`` entry once re-estimated

    @property
    def per_task(self) -> bool:
        """Whether each task gets statistics of its own (``task`` on a backbone with BatchNorm layers)."""
        return self.statistics == "task" and self.present

    @property
    def whole_step(self) -> bool:
        """Whether a training step must normalise all its rows together (``batch`` on a BatchNorm backbone)."""
        return self.statistics == "batch" and self.present

    def training(self, active: bool, total: Callable[[Tensor], Tensor] | None = None):
        """The context of a training step's merged forward: batch statistics (summed over the ranks by ``total``)
        when ``active`` (training, not scoring) and the policy is ``batch``/``task``; otherwise running statistics."""
        if active and self.statistics in ("batch", "task") and self.present:
            return batch_statistics(self.backbone, total=total)
        return nullcontext()

    def reestimated(self, params: Mapping[str, Tensor], batches: list[dict]) -> dict[str, Tensor]:
        """Running statistics re-estimated under the merged weights ``params`` (their buffers ignored: the statistics
        start afresh) on the inputs of ``batches``."""
        device = next(self.backbone.parameters()).device
        buffers = set(dict(self.backbone.named_buffers()))
        weights = {n: t for n, t in params.items() if n not in buffers}
        inputs = [{k: v.to(device) for k, v in b["inputs"].items()} for b in batches]
        return recalibrate_batchnorm(self.backbone, weights, inputs)

    def per_task_reestimated(
        self, params: Mapping[str, Tensor], batches: list[dict], tasks: list[str]
    ) -> dict[str, dict[str, Tensor]]:
        """Per task, statistics re-estimated under ``params`` on that task's rows of ``batches`` alone."""
        out = {}
        for task in tasks:
            rows = task_rows(batches, task)
            if not rows:
                raise MergeInputError(
                    f"batchnorm_statistics 'task': the data has no rows of task {task!r} to "
                    "re-estimate its BatchNorm statistics on"
                )
            out[task] = self.reestimated(params, rows)
        return out

    @torch.no_grad()
    def recalibrate(self, merged: Mapping[str, Tensor], batches: list[dict], tasks: list[str], trained: bool) -> None:
        """Re-estimate the statistics under the final merge ``merged`` on ``batches`` (step-shaped unlabeled rows),
        and each task's own under ``task``; the export and prediction use them from then on."""
        if not batches or not self.present:
            return
        self.stats = self.reestimated(merged, batches)
        self.task_stats = self.per_task_reestimated(merged, batches, tasks) if self.per_task else {}
        self.info = {
            "recalibrated": True,
            "batches": len(batches),
            "per_task": bool(self.task_stats),
            "rows": sum(int(sum(b["sizes"])) for b in batches),
            "layers": len(self.stats) // 3,
            **({"training_statistics": self.statistics} if trained else {}),
        }

    def scoring_params(
        self, params: dict[str, Tensor], batches: list[dict], tasks: list[str]
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]] | None]:
        """``(params, per-task params)`` of the merge as it would be exported now, for label-free scoring: each task's
        statistics re-estimated under this merge (``task``), or one set for every task."""
        if self.per_task:
            return params, self.per_task_reestimated(params, batches, tasks)
        if self.present:
            return {**params, **self.reestimated(params, batches)}, None
        return params, None

    def task_params(self, task: str, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """``params`` with ``task``'s own statistics in place of the shared ones where it has them."""
        own = self.task_stats.get(task)
        if not own:
            return params
        device = next(iter(params.values())).device
        return {**params, **{n: v.to(device) for n, v in own.items()}}
