"""The unlabeled data module: per-task rows in fixed-size steps, sharded over data-parallel ranks, with held-back rows
for label-free selection.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from adamerge.errors import MergeInputError
from adamerge.io.datasets import TaskData, input_builder, load_texts, subset

log = logging.getLogger(__name__)


class TaskStepDataset(Dataset):
    """Index ``i`` → the rows of step ``i`` for every task (see module docstring)."""

    def __init__(
        self,
        rows: dict[str, list],
        samples_per_task: int,
        seed: int,
        collate,
        length: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if samples_per_task % world_size:
            raise MergeInputError(
                f"data.samples_per_task ({samples_per_task}) must be divisible by the number of "
                f"processes ({world_size}): each rank takes an equal share of every step"
            )
        self.rows, self.n, self.seed, self.collate, self.length = rows, samples_per_task, seed, collate, length
        self.rank, self.world_size = rank, world_size
        self._perm_cache: dict[tuple[str, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def _perm(self, t: int, task: str, cycle: int) -> torch.Tensor:
        key = (task, cycle)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.rows):
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + t * 10_007 + cycle)
            self._perm_cache[key] = torch.randperm(len(self.rows[task]), generator=g)
        return self._perm_cache[key]

    def indices(self, t: int, task: str, step: int) -> list[int]:
        m = len(self.rows[task])
        out = []
        for pos in range(step * self.n, (step + 1) * self.n):
            out.append(int(self._perm(t, task, pos // m)[pos % m]))
        return out

    def __getitem__(self, step: int):
        """Step ``step``'s rows of every task; under data parallelism, this rank's contiguous share of them."""
        share = self.n // self.world_size
        return self._rows(step, self.rank * share, (self.rank + 1) * share)

    def whole(self, step: int):
        """Step ``step``'s rows of every task, every rank's share together (what one process trains on)."""
        return self._rows(step, 0, self.n)

    def _rows(self, step: int, lo: int, hi: int):
        tasks = list(self.rows)
        picked = [[self.rows[task][j] for j in self.indices(t, task, step)[lo:hi]] for t, task in enumerate(tasks)]
        return {
            "inputs": self.collate([r for rs in picked for r in rs]),
            "tasks": tasks,
            "sizes": [len(rs) for rs in picked],
            "step": step,
        }


class StepSampler(Sampler[int]):
    """Yields absolute step ids from the trainer's step count at the start of each pass to the end of its epoch:
    ``g, g+1, … ⌈(g+1)/L⌉·L − 1`` for ``g = position()``.

    The dataset maps any step id to its rows, so the rows of a step depend only on how many optimizer steps came
    before it, not on Lightning's epoch counter: Lightning restores a checkpoint written on an epoch's last batch as a
    mid-epoch restart of that epoch, for which an epoch-indexed sampler serves an empty pass, after which its epoch
    and step ids ran one epoch ahead. A resumed run trains on exactly the steps the uninterrupted one would, mid-epoch
    or at an epoch boundary.
    """

    def __init__(self, length: int, position=lambda: 0) -> None:
        self.length, self.position = length, position

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it; the position is the step count, not the epoch
        pass

    def __iter__(self):
        g = int(self.position())
        return iter(range(g, (g // self.length + 1) * self.length))

    def __len__(self) -> int:
        # the full epoch length: on resume Lightning counts the restored batch index against it
        return self.length


class UnlabeledDataModule(pl.LightningDataModule):
    """Unlabeled data of every task (text tokenized once; images processed per step), served as one multi-task
    batch per step.

    Args:
        tasks: task name → :class:`TaskData` (names must match the model's tasks).
        tokenizer: the model source whose tokenizer (text tasks) or image processor (image tasks) prepares the
            inputs (the CLI links it to the model's base).
        samples_per_task: rows of each task per step (AdaMerging uses 16).
        max_length: truncate inputs to this many tokens.
        seed: seeds the per-task permutations.
        steps_per_epoch: dataset length in steps; default: one pass over the largest task.
        num_workers: DataLoader workers.
        holdout: rows of every task held back from training (a seeded choice) for label-free step selection
            (:class:`adamerge.training.SelectStep`); 0 keeps every row for training.
    """

    def __init__(
        self,
        tasks: dict[str, TaskData],
        tokenizer: str | None = None,
        samples_per_task: int = 16,
        max_length: int = 128,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        num_workers: int = 0,
        holdout: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise MergeInputError("data.tasks: at least one task is required")
        if samples_per_task < 1:
            raise MergeInputError(f"data.samples_per_task must be >= 1, got {samples_per_task}")
        if holdout < 0:
            raise MergeInputError(f"data.holdout must be >= 0, got {holdout}")
        self.tasks = {k: (v if isinstance(v, TaskData) else TaskData(**v)) for k, v in tasks.items()}
        self.tokenizer_name = tokenizer
        self.samples_per_task, self.max_length, self.seed = samples_per_task, max_length, seed
        self.steps_per_epoch, self.num_workers, self.holdout = steps_per_epoch, num_workers, holdout
        self.dataset: TaskStepDataset | None = None
        self.held_out: dict[str, list] = {}

    def manifest_entries(self) -> dict:
        """The manifest's ``data`` entry: what the merge adapted on (sources and settings, no rows)."""
        return {
            "data": {
                "max_length": self.max_length,
                "samples_per_task": self.samples_per_task,
                "seed": self.seed,
                "holdout": self.holdout,
                "tasks": {t: {"path": str(spec.path), "split": spec.split} for t, spec in self.tasks.items()},
            }
        }

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        if self.tokenizer_name is None:
            raise MergeInputError("data.tokenizer is not set (the CLI links it to model.base)")
        builder = input_builder(self.tasks, self.tokenizer_name, self.max_length)
        module = self.trainer.lightning_module if self._has_trainer() else None
        if module is not None:  # a MergeModule: its tasks
            model_tasks = module.task_names
            unknown = sorted(set(self.tasks) - set(model_tasks))
            if unknown:
                raise MergeInputError(f"data.tasks: {unknown} have no model; model tasks: {model_tasks}")
        rows = {task: builder.encode(load_texts(spec, task), spec) for task, spec in self.tasks.items()}
        if self.holdout:
            rows, self.held_out = self._split_holdout(rows)
        for task, r in rows.items():
            if len(r) < self.samples_per_task:
                log.warning(
                    "task %r has %d rows, fewer than data.samples_per_task (%d): its rows repeat within each step",
                    task,
                    len(r),
                    self.samples_per_task,
                )
        length = self.steps_per_epoch or max(math.ceil(len(r) / self.samples_per_task) for r in rows.values())
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._has_trainer() else (0, 1)
        self.collate = builder
        self.dataset = TaskStepDataset(
            rows, self.samples_per_task, self.seed, builder, length, rank=rank, world_size=world
        )
        log.info("unlabeled data: %s", {t: len(r) for t, r in rows.items()})

    def first_steps(self, n: int) -> list[dict]:
        """The batches of steps ``0 … n-1`` (fewer when an epoch is shorter), set up first if needed; whole steps,
        the same on every rank under data parallelism (BatchNorm re-estimation, M3's scoring: every rank gets one
        process's result)."""
        self.setup("fit")
        return [self.dataset.whole(i) for i in range(min(n, len(self.dataset)))]

    def _split_holdout(self, rows: dict[str, list]) -> tuple[dict[str, list], dict[str, list]]:
        """Hold back ``holdout`` rows of every task (a seeded choice, independent of the training permutations)."""
        train, held = {}, {}
        for t, (task, r) in enumerate(rows.items()):
            if len(r) <= self.holdout:
                raise MergeInputError(
                    f"data.holdout ({self.holdout}) leaves no training rows for task {task!r}, which has {len(r)}"
                )
            perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(self.seed * 7919 + t + 1)).tolist()
            held[task] = subset(r, perm[: self.holdout])
            train[task] = subset(r, sorted(perm[self.holdout :]))
        return train, held

    def holdout_batches(self, rows_per_task: int | None = None) -> list[dict]:
        """The held-back rows as step-shaped batches of at most ``rows_per_task`` rows of every task (default
        ``samples_per_task``); the same on every rank. Empty when ``holdout`` is 0."""
        if not self.held_out:
            return []
        per = rows_per_task or self.samples_per_task
        tasks = list(self.held_out)
        out = []
        for lo in range(0, self.holdout, per):
            picked = [[self.held_out[t][i] for i in range(lo, min(lo + per, len(self.held_out[t])))] for t in tasks]
            out.append(
                {
                    "inputs": self.collate([r for rs in picked for r in rs]),
                    "tasks": tasks,
                    "sizes": [len(rs) for rs in picked],
                }
            )
        return out

    def _has_trainer(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def train_dataloader(self) -> DataLoader:
        position = lambda: 0  # noqa: E731
        if self._has_trainer():
            trainer = self.trainer
            if trainer.accumulate_grad_batches != 1:
                raise MergeInputError(
                    f"trainer.accumulate_grad_batches must be 1 (got {trainer.accumulate_grad_batches}): a step's rows "
                    "are data.samples_per_task of every task; to bound memory use the method's micro_batches or "
                    "task_chunks, or fewer samples_per_task"
                )
            position = lambda: trainer.global_step  # noqa: E731  (> 0 when resuming from a checkpoint)
        sampler = StepSampler(len(self.dataset), position)
        return DataLoader(self.dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)
