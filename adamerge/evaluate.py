"""Per-task accuracy and macro-F1 (torchmetrics) of exported checkpoints or in-memory models; for causal LMs (no
class heads), the mean next-token negative log-likelihood and perplexity of each task's text; for seq2seq LMs,
accuracy and macro-F1 of the first output token among each class's answer word."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from adamerge.checkpoint.card import EVAL_RESULTS, write_card
from adamerge.errors import MergeInputError
from adamerge.io.datasets import TaskData, input_builder, is_text_folder, load_texts
from adamerge.io.manifest import MANIFEST
from adamerge.io.sources import check_source, names_local_path

log = logging.getLogger(__name__)


@dataclass
class LabeledTaskData(TaskData):
    """A task's labelled evaluation data: :class:`TaskData` plus the integer label column.

    Args:
        label_column: column holding integer class ids.
        answers: seq2seq LMs (text-to-text classification): the answer word of each class id, in order; the model's
            class is the answer whose first token its first output token scores highest.
    """

    label_column: str = "label"
    answers: list[str] | None = None


def answer_logits(logits_fn, spec: LabeledTaskData, task: str, tokenizer):
    """``(logits function over the classes, number of classes)`` of a seq2seq LM's first-output-token logits
    ``[B, 1, V]``: the columns of each class's answer word's first token (words sharing one are refused)."""
    if not spec.answers:
        raise MergeInputError(
            f"task {task!r}: a seq2seq LM is scored on its first output token: give the answer word "
            "of each class id in order (answers: [negative, positive])"
        )
    ids = [(tokenizer(str(w), add_special_tokens=False)["input_ids"] or [None])[0] for w in spec.answers]
    if None in ids or len(set(ids)) < len(ids):
        tokens = {w: (tokenizer.convert_ids_to_tokens(i) if i is not None else None) for w, i in zip(spec.answers, ids)}
        raise MergeInputError(f"task {task!r}: answers must start with distinct tokens; first tokens: {tokens}")
    index = torch.tensor(ids)

    def classes(batch):
        logits = logits_fn(batch)
        return logits[:, 0, index.to(logits.device)]

    return classes, len(ids)


def load_labeled(spec: LabeledTaskData, task: str, inputs):
    """Rows (encoded by ``inputs``, :func:`adamerge.io.datasets.input_builder`) and integer labels of one task."""
    if Path(spec.path).suffix == ".txt" or is_text_folder(spec.path):
        raise MergeInputError(
            f"task {task!r}: {spec.path} is plain text without labels; evaluate needs labelled data: a "
            f".csv/.json/.jsonl/.parquet file or a saved dataset with a {spec.label_column!r} column"
        )
    ds = load_texts(spec, task, extra_columns=(spec.label_column,))
    return inputs.encode(ds, spec), torch.tensor([int(v) for v in ds[spec.label_column]])


@torch.no_grad()
def score(
    logits_fn: Callable[[dict], torch.Tensor],
    rows,
    labels: torch.Tensor,
    num_classes: int,
    collate,
    batch_size: int = 64,
) -> dict:
    """Accuracy and macro-F1 of ``logits_fn(inputs)`` over ``rows``, batched by ``collate`` (rows → inputs, e.g.
    :class:`adamerge.io.datasets.TextInputs`), and the histograms behind them: ``predicted`` (rows per predicted class)
    and ``labels`` (rows per true class) — an accuracy at the majority class's share reads differently from one
    spread over the classes."""
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise MergeInputError(f"labels outside [0, {num_classes}) for a head with {num_classes} classes")
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
    f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
    predicted = torch.zeros(num_classes, dtype=torch.long)
    for i in range(0, len(rows), batch_size):
        logits = logits_fn(collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])).float().cpu()
        y = labels[i : i + batch_size]
        acc.update(logits, y)
        f1.update(logits, y)
        predicted += torch.bincount(logits.argmax(-1), minlength=num_classes)
    return {
        "accuracy": float(acc.compute()),
        "macro_f1": float(f1.compute()),
        "n": len(rows),
        "predicted": predicted.tolist(),
        "labels": torch.bincount(labels, minlength=num_classes).tolist(),
    }


@torch.no_grad()
def score_tokens(logits_fn: Callable[[dict], torch.Tensor], rows, collate, batch_size: int = 64) -> dict:
    """Mean next-token negative log-likelihood (nats per predicted token, padding excluded) of ``logits_fn(inputs)``
    over ``rows``, its perplexity ``exp(nll)``, the tokens predicted and the rows read."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
        logits = logits_fn(batch).float()[:, :-1]
        target = batch["input_ids"][:, 1:].to(logits.device)
        keep = batch["attention_mask"][:, 1:].to(logits.device).bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise MergeInputError("no row has two tokens or more: there is no next token to score")
    mean = total / count
    return {"nll": mean, "perplexity": float(torch.tensor(mean).exp()), "tokens": count, "n": len(rows)}


def evaluate_checkpoint(
    checkpoint: str,
    tasks: dict[str, LabeledTaskData],
    batch_size: int = 64,
    max_length: int | None = None,
    heads: dict[str, str] | None = None,
    write: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-task accuracy and macro-F1 of what a user compares, each task scored with its own head:

    - an adamerge export (``merge_manifest.json``), served as :func:`adamerge.load_merged` serves it (Surgery
      adapters applied);
    - any sequence- or image-classification model directory or hub id (a plain fine-tune, scored on every task);
    - ``checkpoint`` = the pretrained base with ``heads`` = task → fine-tune: the base's encoder with each fine-tune's
      head (the "pretrained + heads" reference).

    A causal LM (an export of kind ``causal_lm``, or a plain model whose architecture is a causal LM) is scored on
    each task's text instead: ``nll``, ``perplexity``, ``tokens`` (:func:`score_tokens`); no label is read. A seq2seq
    LM (``seq2seq_lm``; a plain ``*ForConditionalGeneration``) is scored like a classifier whose classes are each
    task's ``answers`` words (:func:`answer_logits`).

    Args:
        checkpoint: export, model directory or hub id.
        tasks: task name → labelled data (``path``, ``split``, ``text_column`` or ``image_column``, ``label_column``).
        batch_size: evaluation batch size.
        max_length: truncation length; default: the one the merge was trained with (the manifest's
            ``data.max_length``), else 128.
        heads: task → fine-tuned model whose head scores that task on ``checkpoint``'s encoder.
        write: also write the scores to ``<checkpoint>/eval_results.json`` (exports only) and add them to its model
            card.
    """
    if not tasks:
        raise MergeInputError("tasks: give at least one task's labelled data (task: {path: ..., split: ...})")
    path, manifest = _checkpoint(checkpoint)
    if write and manifest is None:
        raise MergeInputError("write: true needs an adamerge export (merge_manifest.json) to write into")
    if max_length is None:
        max_length = int((manifest or {}).get("data", {}).get("max_length") or 128)
    tasks = {t: s if isinstance(s, LabeledTaskData) else LabeledTaskData(**s) for t, s in tasks.items()}
    inputs = input_builder(tasks, str(checkpoint), max_length)  # the export's tokenizer or image processor
    kind = _kind_of(str(checkpoint), manifest, inputs.modality)
    scoring = kind.evaluated_on
    tokens = scoring == "tokens"
    if not kind.per_task_heads and heads is not None:
        raise MergeInputError(
            f"heads: {checkpoint} is {kind.described_as}, which has no class heads to borrow; "
            "evaluate the base model's own directory for the pretrained reference"
        )
    predict = _predictor(str(checkpoint), manifest, heads, list(tasks), kind)
    out = {}
    for task, spec in tasks.items():
        fn, num_labels = predict(task)
        if tokens:  # a causal LM: each task's text scored token by token; no label is read
            out[task] = score_tokens(fn, inputs.encode(load_texts(spec, task), spec), inputs, batch_size)
        else:
            if scoring == "answers":  # a seq2seq LM: its first output token among the classes' answer words
                fn, num_labels = answer_logits(fn, spec, task, inputs.tokenizer)
            rows, labels = load_labeled(spec, task, inputs)
            out[task] = score(fn, rows, labels, num_labels, inputs, batch_size)
        log.info("%s: %s", task, out[task])
    keys = ("nll", "perplexity") if tokens else ("accuracy", "macro_f1")
    out["average"] = {k: sum(v[k] for v in out.values()) / len(out) for k in keys}
    if write:
        (path / EVAL_RESULTS).write_text(json.dumps({"max_length": max_length, "scores": out}, indent=2) + "\n")
        if manifest.get("model_card"):  # the card shows the results
            write_card(path)
    return out


def _checkpoint(checkpoint: str) -> tuple[Path, dict | None]:
    """The checkpoint's path and, for an adamerge export, its manifest; a local path that is no model directory is
    refused by name."""
    check_source(checkpoint, "checkpoint")
    path = Path(checkpoint)
    local = names_local_path(checkpoint)
    if local and not path.is_dir():
        raise MergeInputError(f"checkpoint {checkpoint} does not exist (a directory or a hub id is expected)")
    if local and not (path / "config.json").is_file():
        raise MergeInputError(f"checkpoint {checkpoint} is not a model directory: config.json is missing")
    return path, (json.loads((path / MANIFEST).read_text()) if local and (path / MANIFEST).is_file() else None)


def _kind_of(checkpoint: str, manifest: dict | None, modality: str):
    """The model kind of ``checkpoint``: an export's (its manifest), else a plain model's — a causal or seq2seq LM by
    its config's architecture, otherwise the classifier of the inputs' modality."""
    from adamerge.io.manifest import manifest_kind
    from adamerge.kinds import get_kind

    if manifest is not None:
        return get_kind(manifest_kind(manifest))
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    classifier = get_kind("seq_cls" if modality == "text" else "image_cls")
    try:
        architectures = set(AutoConfig.from_pretrained(checkpoint).architectures or [])
    except (OSError, ValueError):
        return classifier  # loading the model itself reports what is wrong with it

    def names(mapping):
        return {a for n in mapping.values() for a in ((n,) if isinstance(n, str) else n)}

    if architectures & names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return get_kind("causal_lm")
    if architectures & names(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        return get_kind("seq2seq_lm")
    return classifier


def _predictor(checkpoint: str, manifest: dict | None, heads: dict[str, str] | None, tasks: list[str], kind):
    """``task -> (logits function, number of classes)`` for the three kinds of checkpoint (a ``kind`` merged whole,
    an LM, has logits over its vocabulary: no class count)."""
    task_type, tokens = kind.name, not kind.per_task_heads
    if heads is not None:
        missing = sorted(set(tasks) - set(heads))
        if missing:
            raise MergeInputError(f"heads: no fine-tune given for tasks {missing}")
        from adamerge.pool import load_pool

        pool = load_pool(checkpoint, {t: heads[t] for t in tasks}, task_type=task_type)  # base encoder, their heads
        backbone = pool.backbone.eval()

        def with_head(task):
            head = pool.heads[task].eval()
            return (lambda b: kind.head_logits(head, backbone(**b), b), kind.head_info(head)["num_labels"])

        return with_head
    if manifest is not None:
        from adamerge.serving import load_merged

        merged = load_merged(checkpoint)

        def from_export(task):
            if task not in merged.tasks:
                raise MergeInputError(f"task {task!r} is not in {checkpoint}; its tasks: {merged.tasks}")
            classes = None if tokens else int(merged.manifest["heads"][task]["num_labels"])
            return (lambda b: merged.predict(task, **b), classes)

        return from_export
    from adamerge.pool import load_model

    model = kind.prepare(load_model(checkpoint, task_type)).eval()  # seq2seq: its first output token
    return lambda task: (lambda b: model(**b).logits, None if tokens else model.config.num_labels)
