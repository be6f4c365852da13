"""Unlabeled per-task data for merge training.

Each step yields ``samples_per_task`` rows of every task, concatenated into one padded batch::

    {"inputs": {"input_ids": [B, L], "attention_mask": [B, L], ...}, "tasks": [names], "sizes": [n per task]}

Rows are drawn from a seeded permutation of each task's data (a fresh permutation every pass), so step ``i`` is a
pure function of ``(seed, i)``: runs are reproducible and resumable. Label columns are dropped at load time.

Under data parallelism (DDP, ModelParallelStrategy) every rank sees the same step ids and takes an equal contiguous
share of each task's rows of that step, so N processes train on exactly the global batch of a single process.
The trainer must keep this sampler: ``use_distributed_sampler=False`` (the CLI's default).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)

_FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Where one task's unlabeled text lives.

    Args:
        path: a Hugging Face dataset id, a local ``.csv``/``.json``/``.jsonl``/``.parquet`` file, or a directory
            written by ``datasets.Dataset.save_to_disk``.
        split: split to read (hub datasets and ``DatasetDict`` directories).
        text_column: column with the input text.
        text_pair_column: optional second text column (sentence-pair tasks).
        name: dataset configuration name (hub datasets).
        max_samples: keep at most this many rows (the first ones after loading).
    """

    path: str
    split: str = "train"
    text_column: str = "text"
    text_pair_column: str | None = None
    name: str | None = None
    max_samples: int | None = None


def load_texts(spec: TaskData, task: str = "?", extra_columns: tuple[str, ...] = ()):
    """Load a task's rows as a ``datasets.Dataset`` holding only its text column(s) (and ``extra_columns``)."""
    import datasets

    p = Path(spec.path)
    try:
        if p.is_file():
            fmt = _FILE_FORMATS.get(p.suffix)
            if fmt is None:
                raise MergeInputError(f"task {task!r}: unsupported file type {p.suffix!r} for {p}; "
                                      f"use one of {sorted(_FILE_FORMATS)}")
            if p.stat().st_size == 0:
                raise MergeInputError(f"task {task!r}: data file {p} is empty (0 bytes)")
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        elif p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise MergeInputError(f"task {task!r}: split {spec.split!r} not in {p}; splits: {list(ds)}")
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except MergeInputError:
        raise
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        if "corresponds to no data" in str(e):  # what `datasets` says of a file with a header and no rows
            raise MergeInputError(f"task {task!r}: dataset {spec.path!r} is empty") from e
        raise MergeInputError(f"task {task!r}: cannot load data from {spec.path!r}: {e}") from e
    texts = [c for c in (spec.text_column, spec.text_pair_column) if c]
    keep = [*texts, *extra_columns]
    for c in keep:
        if c not in ds.column_names:
            kind = "text column" if c in texts else "column"
            raise MergeInputError(f"task {task!r}: {kind} {c!r} not in {spec.path}; columns: {ds.column_names}")
    ds = ds.select_columns(keep)
    if spec.max_samples is not None:
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    if len(ds) == 0:
        raise MergeInputError(f"task {task!r}: dataset {spec.path!r} is empty")
    return ds


def tokenize(tokenizer, ds, spec: TaskData, max_length: int) -> list[dict[str, list[int]]]:
    texts = [str(t) for t in ds[spec.text_column]]
    pairs = [str(t) for t in ds[spec.text_pair_column]] if spec.text_pair_column else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows into tensors (``attention_mask`` 0 on padding)."""
    length = max(len(r["input_ids"]) for r in rows)
    out = {}
    for k in rows[0]:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.tensor([r[k] + [fill] * (length - len(r[k])) for r in rows], dtype=torch.long)
    return out


class TaskStepDataset(Dataset):
    """Index ``i`` → the rows of step ``i`` for every task (see module docstring)."""

    def __init__(self, rows: dict[str, list], samples_per_task: int, seed: int, pad_id: int, length: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if samples_per_task % world_size:
            raise MergeInputError(f"data.samples_per_task ({samples_per_task}) must be divisible by the number of "
                                  f"processes ({world_size}): each rank takes an equal share of every step")
        self.rows, self.n, self.seed, self.pad_id, self.length = rows, samples_per_task, seed, pad_id, length
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
        tasks = list(self.rows)
        share = self.n // self.world_size
        lo, hi = self.rank * share, (self.rank + 1) * share
        picked = [[self.rows[task][j] for j in self.indices(t, task, step)[lo:hi]] for t, task in enumerate(tasks)]
        return {"inputs": pad_batch([r for rs in picked for r in rs], self.pad_id), "tasks": tasks,
                "sizes": [len(rs) for rs in picked], "step": step}


class StepSampler(Sampler[int]):
    """Yields absolute step ids ``epoch·L … (epoch+1)·L − 1``, skipping those before ``start``.

    The dataset maps any step id to its rows, so starting at the restored ``global_step`` continues a killed run
    exactly where it stopped (Lightning calls :meth:`set_epoch` each epoch).
    """

    def __init__(self, length: int, start: int = 0) -> None:
        self.length, self.start, self.epoch = length, start, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        lo, hi = self.epoch * self.length, (self.epoch + 1) * self.length
        return iter(range(max(lo, self.start), hi))

    def __len__(self) -> int:
        # the full epoch length: on resume Lightning counts the restored batch index against it
        return self.length


class UnlabeledDataModule(pl.LightningDataModule):
    """Unlabeled text of every task, tokenized once, served as one multi-task batch per step.

    Args:
        tasks: task name → :class:`TaskData` (names must match the model's tasks).
        tokenizer: tokenizer id or directory (defaults to the model's base when linked by the CLI).
        samples_per_task: rows of each task per step (AdaMerging uses 16).
        max_length: truncate inputs to this many tokens.
        seed: seeds the per-task permutations.
        steps_per_epoch: dataset length in steps; default: one pass over the largest task.
        num_workers: DataLoader workers.
        holdout: rows of every task held back from training (a seeded choice) for label-free step selection
            (:class:`adamerge.callbacks.SelectStep`); 0 keeps every row for training.
    """

    def __init__(self, tasks: dict[str, TaskData], tokenizer: str | None = None, samples_per_task: int = 16,
                 max_length: int = 128, seed: int = 0, steps_per_epoch: int | None = None,
                 num_workers: int = 0, holdout: int = 0) -> None:
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

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        from transformers import AutoTokenizer

        if self.tokenizer_name is None:
            raise MergeInputError("data.tokenizer is not set (the CLI links it to model.base)")
        tok = AutoTokenizer.from_pretrained(self.tokenizer_name)
        model_tasks = getattr(getattr(self.trainer, "lightning_module", None), "task_names", None) if self._has_trainer() else None
        if model_tasks is not None:
            unknown = sorted(set(self.tasks) - set(model_tasks))
            if unknown:
                raise MergeInputError(f"data.tasks: {unknown} have no model; model tasks: {model_tasks}")
        rows = {task: tokenize(tok, load_texts(spec, task), spec, self.max_length) for task, spec in self.tasks.items()}
        if self.holdout:
            rows, self.held_out = self._split_holdout(rows)
        length = self.steps_per_epoch or max(math.ceil(len(r) / self.samples_per_task) for r in rows.values())
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._has_trainer() else (0, 1)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)  # LLM tokenizers
        self.pad_id = pad_id
        self.dataset = TaskStepDataset(rows, self.samples_per_task, self.seed, pad_id, length,
                                       rank=rank, world_size=world)
        log.info("unlabeled data: %s", {t: len(r) for t, r in rows.items()})

    def _split_holdout(self, rows: dict[str, list]) -> tuple[dict[str, list], dict[str, list]]:
        """Hold back ``holdout`` rows of every task (a seeded choice, independent of the training permutations)."""
        train, held = {}, {}
        for t, (task, r) in enumerate(rows.items()):
            if len(r) <= self.holdout:
                raise MergeInputError(f"data.holdout ({self.holdout}) leaves no training rows for task {task!r}, "
                                      f"which has {len(r)}")
            perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(self.seed * 7919 + t + 1)).tolist()
            held[task] = [r[i] for i in perm[: self.holdout]]
            train[task] = [r[i] for i in sorted(perm[self.holdout:])]
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
            picked = [self.held_out[t][lo:lo + per] for t in tasks]
            out.append({"inputs": pad_batch([r for rs in picked for r in rs], self.pad_id), "tasks": tasks,
                        "sizes": [len(rs) for rs in picked]})
        return out

    def _has_trainer(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self._has_trainer() else 0  # > 0 when resuming from a checkpoint
        sampler = StepSampler(len(self.dataset), start)
        if self._has_trainer():
            sampler.set_epoch(self.trainer.current_epoch)
        return DataLoader(self.dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers)
