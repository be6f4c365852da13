"""Export a merge as a flattened Hugging Face checkpoint, atomically.

Layout of ``output_dir``::

    config.json, model.safetensors   the merged backbone: ``transformers.AutoModel.from_pretrained(output_dir)``
                                     (causal LMs: the whole merged ``AutoModelForCausalLM``); above
                                     ``max_shard_size``: ``model-0000k-of-0000n.safetensors`` +
                                     ``model.safetensors.index.json``, as ``save_pretrained`` writes them
    tokenizer files                  the base model's (the union vocabulary when fine-tunes added tokens)
    heads.safetensors                every task's head, keys ``<task>/<param>``
    task_buffers.safetensors         (optional, ``batchnorm_statistics: task``) each task's own BatchNorm running
                                     statistics, keys ``<task>/<buffer>``: they replace the root's for that task in
                                     ``tasks/<task>/``, :func:`load_task_model` and ``adamerge.load_merged``
    adapters/<task>/                 (optional, merges of LoRA adapters) a PEFT LoRA adapter per task
    tasks/<task>/                    (optional) a complete ``*ForSequenceClassification`` checkpoint per task:
                                     ``AutoModelForSequenceClassification.from_pretrained(output_dir / "tasks" / task)``
    README.md, coefficients.png      (optional) the Hub model card (see :mod:`adamerge.checkpoint.card`)
    merge_manifest.json              method, base and sources with content hashes, coefficients, dtype, versions

Weights are written tensor by tensor (a lazy merge is merged one block at a time on access), stored in ``dtype``.
Everything is written into a temporary sibling directory that is renamed into place at the end, so an interrupted
export never leaves a half-written ``output_dir``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from adamerge.checkpoint.card import write_card
from adamerge.errors import MergeInputError
from adamerge.io.manifest import HEADS, MANIFEST, TASK_BUFFERS, _json_default, versions
from adamerge.io.safetensors import WEIGHTS_INDEX, _contiguous, atomic_directory, parse_size, store_dtype, write_weights
from adamerge.kinds import get_kind

log = logging.getLogger(__name__)


def _load_preprocessor(kind, source: str):
    """The base's tokenizer (text kinds) or image processor (image kinds), or None with a warning."""
    try:
        return kind.preprocessor(source)
    except (OSError, ValueError) as e:
        log.warning(
            "no %s copied from %s: %s", "tokenizer" if kind.modality == "text" else "image processor", source, e
        )
        return None


def head_state(head: torch.nn.Module) -> dict[str, Tensor]:
    """A head shell's own parameters (its backbone is a stub)."""
    return {k: v for k, v in head.state_dict().items()}


@dataclass
class ExportOptions:
    """How a merge is written (``adamerge merge``: top-level keys; ``adamerge fit``: ``export.*`` keys).

    Args:
        per_task_models: also write ``tasks/<task>/``, a complete sequence-classification checkpoint per task.
        lora_adapters: for merges of LoRA adapters, also write ``adapters/<task>/`` PEFT adapters.
        model_card: write ``README.md``, a Hub model card (front matter, sources, coefficients, data, config).
        max_shard_size: largest weights file, e.g. ``"5GB"`` (the ``transformers`` default), ``"500MB"``; larger
            models are written as ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
        dtype: dtype of the stored weights: ``float32``, ``bfloat16`` or ``float16`` (merging computes in float32).
        push_to_hub: a Hub repo id (``user/name``): upload the finished export there (token: ``HF_TOKEN`` or
            ``hf auth login``).
        hub_private: create the repo private (when it does not exist yet).
        hub_revision: upload to this branch (created if missing); default the repo's main branch.
    """

    per_task_models: bool = True
    lora_adapters: bool = False
    model_card: bool = True
    max_shard_size: str = "5GB"
    dtype: str = "float32"
    push_to_hub: str | None = None
    hub_private: bool = False
    hub_revision: str | None = None

    def __post_init__(self) -> None:
        store_dtype(self.dtype)
        parse_size(self.max_shard_size)
        if self.push_to_hub is not None and not str(self.push_to_hub).strip():
            raise MergeInputError("push_to_hub: empty repo id; give `user/name` or leave it unset")


def _set_dtype(config, dtype: torch.dtype) -> None:
    """Record the stored dtype in a config (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def write_merged(
    output_dir: str | Path,
    backbone: torch.nn.Module,
    merged: Mapping[str, Tensor],
    heads: Mapping[str, torch.nn.Module],
    manifest: dict[str, Any],
    tokenizer_source: str | None = None,
    per_task_models: bool = True,
    overwrite: bool = False,
    extra_files: Mapping[str, Mapping[str, Tensor]] | None = None,
    extra_writer: Callable[[Path], Any] | None = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    model_card: bool = True,
    kind=None,
    task_tensors: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> Path:
    """Write the flattened checkpoint (see module docstring) and return its path.

    Args:
        backbone: the base backbone module (supplies config and the non-merged tensors).
        merged: merged backbone tensors by parameter name; read one at a time, so a lazy mapping (one block merged
            on access, :meth:`adamerge.engine.model.MergedModel.lazy_merged_params`) keeps the export to one block's
            memory beyond the model.
        heads: task → head (a ``*For<Task>`` shell whose backbone is a stub, or the kind's own head module).
        manifest: method-specific fields; versions and the layout are added here.
        extra_files: more safetensors files to write, name → tensors (e.g. surgery adapters).
        extra_writer: called with the temporary directory to write more files (e.g. PEFT adapters); its return
            value is recorded in the manifest as ``extra``.
        tokenizer: a tokenizer object to save (e.g. a union vocabulary); else the kind's preprocessor (tokenizer or
            image processor) of ``tokenizer_source``.
        dtype, max_shard_size, model_card: see :class:`ExportOptions`.
        kind: the model kind (:mod:`adamerge.kinds`; default ``seq_cls``): what the heads are, how a per-task
            checkpoint is written.
        task_tensors: task → backbone tensors of that task's own that replace the merged ones in its per-task
            checkpoint (BatchNorm statistics per task), also written to ``task_buffers.safetensors``.
    """
    kind = kind or get_kind("seq_cls")
    target_dtype = store_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    weights = _BackboneWeights(backbone, merged, target_dtype)
    for task, own in (task_tensors or {}).items():
        unknown = sorted(set(own) - set(weights.names))
        if unknown:
            raise MergeInputError(f"task_tensors[{task!r}]: {unknown[:3]} are not tensors of the backbone")
    config = copy.deepcopy(backbone.config)
    config.architectures = [type(backbone).__name__]  # the root is exactly this class: AutoModel(ForCausalLM) loads it
    _set_dtype(config, target_dtype)
    if tokenizer is None and tokenizer_source:  # loaded once, saved into the root and every tasks/<task>/
        tokenizer = _load_preprocessor(kind, tokenizer_source)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        # the backbone tensors a task's own checkpoint holds values of its own for (a head's pooler, per-task BatchNorm
        # statistics) sit in root shards of their own, which that task's checkpoint does not link
        apart = _task_owned(heads, kind, config, task_tensors) if per_task_models else set()
        files = write_weights(tmp, weights.entries, weights.produce, max_bytes, apart=apart)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        head_tensors, head_info, shared = {}, {}, []
        for task, head in heads.items():
            hs = head_state(head)
            head_tensors.update({f"{task}/{k}": v for k, v in hs.items()})
            head_info[task] = {**kind.head_info(head), "params": sorted(hs)}
            task_files = kind.task_model_files(head, config) if per_task_models else None
            if task_files is not None:
                shared.append(
                    _write_task_model(
                        tmp / "tasks" / task,
                        task_files,
                        hs,
                        weights,
                        tmp,
                        (task_tensors or {}).get(task, {}),
                        tokenizer,
                    )
                )
        save_file(_contiguous(head_tensors, target_dtype), str(tmp / HEADS), metadata={"format": "pt"})
        manifest = _write_extras(tmp, manifest, task_tensors, extra_files, extra_writer, target_dtype)
        doc = {
            **manifest,
            "task_type": kind.name,
            "heads": head_info,
            "per_task_models": bool(shared),
            **({"task_weights": max(shared, key=("symlink", "hardlink", "copy").index)} if shared else {}),
            "weights": {"dtype": dtype, "max_shard_size": str(max_shard_size), "files": files},
            "model_card": model_card,
            "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
        if model_card:
            write_card(tmp)
    log.info("exported merged checkpoint to %s", output_dir)
    return Path(output_dir)


class _BackboneWeights:
    """The root checkpoint's tensors: the merged ones where the merge has them (tied names resolved), the base's
    otherwise, each stored in ``target_dtype`` when floating point."""

    def __init__(self, backbone: torch.nn.Module, merged: Mapping[str, Tensor], target_dtype: torch.dtype) -> None:
        self.merged, self.target_dtype = merged, target_dtype
        self.state = backbone.state_dict()  # references to the base tensors, no copies
        self.tied: dict[str, str] = {}
        canonical: dict[int, str] = {}
        for name, p in backbone.named_parameters(remove_duplicate=False):  # tied weights (lm_head = embeddings)
            self.tied[name] = canonical.setdefault(id(p), name)
        self.names = [k for k in self.state if not k.endswith(("position_ids",))]
        self.entries = [(n, tuple(self.state[n].shape), self.stored(self.state[n])) for n in self.names]

    def produce(self, name: str) -> Tensor:
        if name in self.merged:
            return self.merged[name]
        if self.tied.get(name, name) in self.merged:
            return self.merged[self.tied[name]]
        return self.state[name]

    def stored(self, t: Tensor) -> torch.dtype:
        return self.target_dtype if t.is_floating_point() else t.dtype


TASK_WEIGHTS = "model-task.safetensors"


def _write_task_model(
    d: Path, task_files, hs: dict[str, Tensor], weights: _BackboneWeights, root: Path,
    own: Mapping[str, Tensor], tokenizer,
) -> str:  # fmt: skip
    """``tasks/<task>/``: a stock ``*For<Task>`` checkpoint that stores only what differs from the root — its config,
    its head ``hs`` (a head holding its own pooler replaces the merged one) and its own backbone tensors ``own``
    (BatchNorm statistics) in ``model-task.safetensors`` — and reads every other backbone tensor from the root's
    weights files, which it links (``model-root-*.safetensors``: symbolic links, else hard links, else copies with a
    note). Its ``model.safetensors.index.json`` maps each tensor to its file, as a sharded ``save_pretrained`` does.
    Returns how the root's files were shared (``symlink``, ``hardlink`` or ``copy``)."""
    head_config, prefix = task_files
    d.mkdir(parents=True)
    _set_dtype(head_config, weights.target_dtype)
    head_config.save_pretrained(str(d))
    mine = {**{f"{prefix}.{n}": v for n, v in own.items()}, **hs}
    replaced = {k[len(prefix) + 1 :] for k in mine if k.startswith(prefix + ".")}
    root_map = _weight_files(root)
    local = {name: f"model-root-{i:05d}.safetensors" for i, name in enumerate(sorted(set(root_map.values())), 1)}
    shared = {f for n, f in root_map.items() if n not in replaced}
    if shared & {f for n, f in root_map.items() if n in replaced}:  # would carry the root's values of the task's own
        raise RuntimeError(f"{d}: root shards mix tensors the task replaces with shared ones")
    hows = [_share(root / name, d / local[name]) for name in sorted(shared)]  # only the shards the task reads
    save_file(_contiguous(mine, weights.target_dtype), str(d / TASK_WEIGHTS), metadata={"format": "pt"})
    weight_map = {n: local[f] for n, f in root_map.items() if n not in replaced}
    weight_map.update({k: TASK_WEIGHTS for k in mine})
    sizes = _tensor_bytes([root / name for name in sorted(shared)] + [d / TASK_WEIGHTS])
    total = sum(sizes[n] for n in weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return max(hows, key=("symlink", "hardlink", "copy").index)


def _task_owned(heads: Mapping[str, torch.nn.Module], kind, config, task_tensors) -> set[str]:
    """Root tensor names some task's checkpoint holds a value of its own for: a head's own backbone modules (its
    pooler, ``heads: {pooler: true}``) and per-task tensors (BatchNorm statistics)."""
    names = {n for own in (task_tensors or {}).values() for n in own}
    for head in heads.values():
        files = kind.task_model_files(head, config)
        if files is not None:
            prefix = files[1] + "."
            names |= {k[len(prefix) :] for k in head_state(head) if k.startswith(prefix)}
    return names


def _weight_files(directory: Path) -> dict[str, str]:
    """Tensor name → weights file of a checkpoint directory (its index, or the single ``model.safetensors``)."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(directory / "model.safetensors"), framework="pt") as h:
        return {k: "model.safetensors" for k in h.keys()}


def _tensor_bytes(paths: list[Path]) -> dict[str, int]:
    """Byte size of every tensor in safetensors files, from their headers (no tensor is read)."""
    sizes = {}
    for path in paths:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return sizes


def _share(source: Path, target: Path) -> str:
    """Make ``target`` the file ``source`` is without a second copy where the filesystem allows: a relative symbolic
    link (an uploaded folder carries the content; the Hub stores it once), else a hard link, else a copy."""
    try:
        target.symlink_to(os.path.relpath(source, target.parent))
        return "symlink"
    except OSError:
        pass
    try:
        os.link(source, target)
        return "hardlink"
    except OSError:
        shutil.copyfile(source, target)
        log.warning("%s: the filesystem links no files; the root's weights are copied", target.parent)
        return "copy"


def _write_extras(
    tmp: Path, manifest: dict[str, Any], task_tensors, extra_files, extra_writer, target_dtype: torch.dtype
) -> dict[str, Any]:
    """Per-task buffers, the method's extra files and the extra writer's output; the manifest with their entries."""
    if task_tensors:
        save_file(
            _contiguous({f"{t}/{n}": v for t, own in task_tensors.items() for n, v in own.items()}, target_dtype),
            str(tmp / TASK_BUFFERS),
            metadata={"format": "pt"},
        )
        manifest = {
            **manifest,
            "task_buffers": {
                "file": TASK_BUFFERS,
                "tasks": sorted(task_tensors),
                "tensors": sorted({n for own in task_tensors.values() for n in own}),
            },
        }
    for name, tensors in (extra_files or {}).items():
        save_file(_contiguous(tensors), str(tmp / name), metadata={"format": "pt"})
    extra = extra_writer(tmp) if extra_writer else None
    if extra is not None:
        manifest = {**manifest, "extra": [str(Path(p).relative_to(tmp)) for p in extra]}
    return manifest
