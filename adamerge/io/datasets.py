"""Unlabeled per-task data for merge training.

Each step yields ``samples_per_task`` rows of every task, concatenated into one padded batch::

    {"inputs": {"input_ids": [B, L], "attention_mask": [B, L], ...}, "tasks": [names], "sizes": [n per task]}

Image tasks (``image_column`` set) give ``{"inputs": {"pixel_values": [B, 3, H, W]}, ...}``: images are decoded and
run through the base's image processor per step (only the rows of that step are held in memory).

Rows are drawn from a seeded permutation of each task's data (a fresh permutation every pass), so step ``i`` is a
pure function of ``(seed, i)``: runs are reproducible and resumable. Label columns are dropped at load time.

Under data parallelism (DDP, ModelParallelStrategy) every rank sees the same step ids and takes an equal contiguous
share of each task's rows of that step, so N processes train on exactly the global batch of a single process.
The trainer must keep this sampler: ``use_distributed_sampler=False`` (the CLI's default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)

_FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Where one task's unlabeled inputs live (text, or images with ``image_column``).

    Args:
        path: a Hugging Face dataset id, a local ``.csv``/``.json``/``.jsonl``/``.parquet`` file, a ``.txt`` file or
            a folder of ``.txt`` files (one row per non-empty line, column ``text``), a directory written by
            ``datasets.Dataset.save_to_disk``, or (images) an ``imagefolder`` directory.
        split: split to read (hub datasets and ``DatasetDict`` directories).
        text_column: column with the input text.
        text_pair_column: optional second text column (sentence-pair tasks).
        name: dataset configuration name (hub datasets).
        max_samples: keep at most this many rows (the first ones after loading).
        image_column: column with the input images (a ``datasets.Image`` feature); set for image tasks, whose
            ``text_column`` is then ignored.
        template: the text the model reads, a format string over the row's columns (``"premise: {premise}
            hypothesis: {hypothesis}"``): the prompts a text-to-text or instruction fine-tune was trained on;
            ``text_column`` and ``text_pair_column`` are then ignored.
    """

    path: str
    split: str = "train"
    text_column: str = "text"
    text_pair_column: str | None = None
    name: str | None = None
    max_samples: int | None = None
    image_column: str | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        if self.template is not None:
            if self.image_column:
                raise MergeInputError(f"template: {self.path} is an image task (image_column); templates format text")
            template_fields(self.template)

    @property
    def input_columns(self) -> list[str]:
        if self.image_column:
            return [self.image_column]
        if self.template is not None:
            return template_fields(self.template)
        return [c for c in (self.text_column, self.text_pair_column) if c]


def template_fields(template: str) -> list[str]:
    """The columns a ``template`` reads (each once, in order); a template that reads none, or reads something other
    than a column by name (``{0}``, ``{row.text}``, ``{row[0]}``), is refused."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise MergeInputError(f"template {template!r}: {e}") from e
    bad = [f for f in names if not f.isidentifier()]
    if not names or bad:
        raise MergeInputError(
            f"template {template!r}: name the columns it reads as {{column}}"
            + (f"; not {bad}" if bad else " (it reads none)")
        )
    return list(dict.fromkeys(names))


def open_dataset(path: str, split: str = "train", name: str | None = None, task: str = "?"):
    """A ``datasets.Dataset`` from a hub id, a local data file, plain text (a ``.txt`` file or a folder of them), a
    ``save_to_disk`` directory or an image folder."""
    import datasets

    p = Path(path)
    try:
        if p.suffix == ".txt" and p.is_file() or p.is_dir() and _text_files(p):
            return _plain_text(p, task)
        if p.is_file():
            fmt = _FILE_FORMATS.get(p.suffix)
            if fmt is None:
                raise MergeInputError(
                    f"task {task!r}: unsupported file type {p.suffix!r} for {p}; use one of "
                    f"{sorted([*_FILE_FORMATS, '.txt'])} or a folder of .txt files"
                )
            if p.stat().st_size == 0:
                raise MergeInputError(f"task {task!r}: data file {p} is empty (0 bytes)")
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        elif p.is_dir() and not (p / "dataset_info.json").is_file() and not (p / "dataset_dict.json").is_file():
            ds = datasets.load_dataset("imagefolder", data_dir=str(p), split=split)  # class folders of images
        elif p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise MergeInputError(f"task {task!r}: split {split!r} not in {p}; splits: {list(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, name, split=split)
    except MergeInputError:
        raise
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        if "corresponds to no data" in str(e):  # what `datasets` says of a file with a header and no rows
            raise MergeInputError(f"task {task!r}: dataset {path!r} is empty") from e
        raise MergeInputError(f"task {task!r}: cannot load data from {path!r}: {e}") from e
    return ds


def _text_files(folder: Path) -> list[Path]:
    """The ``.txt`` files under ``folder`` (recursively, in name order) when it holds no saved dataset and no images
    (an ``imagefolder``)."""
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        return []
    files = sorted(f for f in folder.rglob("*.txt") if f.is_file())
    images = any(f.suffix.lower() in _IMAGE_SUFFIXES for f in folder.rglob("*") if f.is_file())
    return [] if images else files


def is_text_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder read as plain text (``.txt`` files, no saved dataset, no images)."""
    return Path(path).is_dir() and bool(_text_files(Path(path)))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _plain_text(path: Path, task: str):
    """Plain text as a dataset with one ``text`` column: a ``.txt`` file, or every ``.txt`` file of a folder, one row
    per non-empty line (surrounding white space stripped)."""
    import datasets

    files = [path] if path.is_file() else _text_files(path)
    rows = [line.strip() for f in files for line in f.read_text(encoding="utf-8", errors="replace").splitlines()]
    rows = [r for r in rows if r]
    if not rows:
        raise MergeInputError(f"task {task!r}: {path} has no non-empty line of text")
    return datasets.Dataset.from_dict({"text": rows})


def load_texts(spec: TaskData, task: str = "?", extra_columns: tuple[str, ...] = ()):
    """Load a task's rows as a ``datasets.Dataset`` holding only its input column(s) (and ``extra_columns``)."""
    ds = open_dataset(spec.path, spec.split, spec.name, task)
    texts = spec.input_columns
    keep = [*texts, *extra_columns]
    for c in keep:
        if c not in ds.column_names:
            kind = ("image column" if spec.image_column else "text column") if c in texts else "column"
            raise MergeInputError(f"task {task!r}: {kind} {c!r} not in {spec.path}; columns: {ds.column_names}")
    ds = ds.select_columns(keep)
    if spec.max_samples is not None:
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    if len(ds) == 0:
        raise MergeInputError(f"task {task!r}: dataset {spec.path!r} is empty")
    return ds


def tokenize(tokenizer, ds, spec: TaskData, max_length: int) -> list[dict[str, list[int]]]:
    if spec.template is not None:
        columns = spec.input_columns
        texts = [spec.template.format(**dict(zip(columns, values))) for values in zip(*(ds[c] for c in columns))]
        pairs = None
    else:
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


class LazyImages:
    """A task's images, decoded only when a row is read (a step decodes its own rows)."""

    def __init__(self, ds, column: str) -> None:
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[int(i)][self.column]

    def subset(self, indices: list[int]) -> LazyImages:
        return LazyImages(self.ds.select(indices), self.column)


def subset(rows, indices: list[int]):
    """``rows`` restricted to ``indices`` (lazy rows stay lazy)."""
    return rows.subset(indices) if hasattr(rows, "subset") else [rows[i] for i in indices]


class TextInputs:
    """Tokenizes a task's text once (:meth:`encode`) and pads a step's rows into tensors (``__call__``)."""

    modality = "text"

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def encode(self, ds, spec: TaskData):
        return tokenize(self.tokenizer, ds, spec, self.max_length)

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        return pad_batch(rows, self.pad_id)


# what an image processor returns beside pixel_values that the vision tower reads: SigLIP 2's NaFlex patches (each
# image's valid patches and their grid); other processor outputs are not model inputs of the supported kinds
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class ImageInputs:
    """Keeps a task's images lazily (:meth:`encode`) and runs the image processor over a step's rows
    (``__call__``): ``{"pixel_values": [n, 3, H, W]}`` (SigLIP 2: ``[n, patches, 3·p·p]`` with its
    ``pixel_attention_mask`` and ``spatial_shapes``). Images are converted to RGB (grayscale digits included)."""

    modality = "image"

    def __init__(self, processor) -> None:
        self.processor = processor

    def encode(self, ds, spec: TaskData) -> LazyImages:
        return LazyImages(ds, spec.image_column)

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        images = [r.convert("RGB") if hasattr(r, "convert") else r for r in rows]
        out = self.processor(images=images, return_tensors="pt")
        return {k: out[k] for k in IMAGE_INPUTS if k in out}


def input_builder(specs, source: str, max_length: int, trust_remote_code: bool = False):
    """:class:`TextInputs` (the tokenizer of ``source``) or :class:`ImageInputs` (its image processor), as the tasks'
    ``image_column`` says; every task must be of the same modality."""
    image = {t: bool(s.image_column) for t, s in specs.items()}
    if len(set(image.values())) > 1:
        raise MergeInputError(
            f"data.tasks: image tasks {sorted(t for t, v in image.items() if v)} and text tasks "
            f"{sorted(t for t, v in image.items() if not v)} cannot be mixed in one merge"
        )
    try:
        if any(image.values()):
            from transformers import AutoImageProcessor

            return ImageInputs(AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code))
        from transformers import AutoTokenizer

        return TextInputs(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code), max_length)
    except (OSError, ValueError) as e:
        what = "image processor" if any(image.values()) else "tokenizer"
        raise MergeInputError(f"data.tokenizer: cannot load the {what} of {source!r}: {e}") from e
