"""Per-task accuracy and macro-F1 (torchmetrics) of exported checkpoints or in-memory models."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from adamerge.data import TaskData, load_texts, pad_batch, tokenize
from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)


@dataclass
class LabeledTaskData(TaskData):
    """A task's labelled evaluation data: :class:`TaskData` plus the integer label column.

    Args:
        label_column: column holding integer class ids.
    """

    label_column: str = "label"


def load_labeled(spec: LabeledTaskData, task: str, tokenizer, max_length: int):
    """Tokenized rows and integer labels of one task."""
    ds = load_texts(spec, task, extra_columns=(spec.label_column,))
    return tokenize(tokenizer, ds, spec, max_length), torch.tensor([int(v) for v in ds[spec.label_column]])


@torch.no_grad()
def score(logits_fn: Callable[[dict], torch.Tensor], rows, labels: torch.Tensor, num_classes: int, pad_id: int,
          batch_size: int = 64) -> dict[str, float]:
    """Accuracy and macro-F1 of ``logits_fn(inputs)`` over tokenized ``rows``."""
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise MergeInputError(f"labels outside [0, {num_classes}) for a head with {num_classes} classes")
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
    f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
    for i in range(0, len(rows), batch_size):
        logits = logits_fn(pad_batch(rows[i:i + batch_size], pad_id)).float().cpu()
        y = labels[i:i + batch_size]
        acc.update(logits, y)
        f1.update(logits, y)
    return {"accuracy": float(acc.compute()), "macro_f1": float(f1.compute()), "n": len(rows)}


def evaluate_checkpoint(checkpoint: str, tasks: dict[str, LabeledTaskData], batch_size: int = 64,
                        max_length: int = 128) -> dict[str, dict[str, float]]:
    """Evaluate an exported merged checkpoint on each task's labelled data with that task's own head.

    Args:
        checkpoint: directory written by ``adamerge fit``/``merge``.
        tasks: task name → labelled data.
        batch_size: evaluation batch size.
        max_length: truncation length.
    """
    from transformers import AutoTokenizer

    from adamerge.export import load_task_model

    tok = AutoTokenizer.from_pretrained(checkpoint)
    out = {}
    for task, spec in tasks.items():
        spec = spec if isinstance(spec, LabeledTaskData) else LabeledTaskData(**spec)
        model = load_task_model(checkpoint, task)
        rows, labels = load_labeled(spec, task, tok, max_length)
        out[task] = score(lambda b: model(**b).logits, rows, labels, model.config.num_labels,
                          tok.pad_token_id or 0, batch_size)
        log.info("%s: %s", task, out[task])
    out["average"] = {k: sum(v[k] for v in out.values()) / len(out) for k in ("accuracy", "macro_f1")}
    return out
