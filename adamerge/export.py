"""Export a merge as a flattened Hugging Face checkpoint, atomically.

Layout of ``output_dir``::

    config.json, model.safetensors   the merged backbone: ``transformers.AutoModel.from_pretrained(output_dir)``
                                     (causal LMs: the whole merged ``AutoModelForCausalLM``)
    tokenizer files                  copied from the base model when it has them
    heads.safetensors                every task's head, keys ``<task>/<param>``
    adapters/<task>/                 (optional, merges of LoRA adapters) a PEFT LoRA adapter per task
    tasks/<task>/                    (optional) a complete ``*ForSequenceClassification`` checkpoint per task:
                                     ``AutoModelForSequenceClassification.from_pretrained(output_dir / "tasks" / task)``
    merge_manifest.json              method, base and sources with content hashes, coefficients, versions

Everything is written into a temporary sibling directory that is renamed into place at the end, so an interrupted
export never leaves a half-written ``output_dir``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)

MANIFEST = "merge_manifest.json"
HEADS = "heads.safetensors"


def versions() -> dict[str, str]:
    import transformers

    from adamerge import __version__

    return {"adamerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success rename it to ``target``.

    Refuses an existing ``target`` unless ``overwrite``; on any error (or interrupt) the temporary directory is
    removed and ``target`` is untouched.
    """
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise MergeInputError(f"output_dir {target} already exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _copy_tokenizer(source: str, dest: Path) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(str(dest))
    except (OSError, ValueError) as e:
        log.warning("no tokenizer copied from %s: %s", source, e)


def head_state(head: torch.nn.Module) -> dict[str, Tensor]:
    """A head shell's own parameters (its backbone is a stub)."""
    return {k: v for k, v in head.state_dict().items()}


def write_merged(output_dir: str | Path, backbone: torch.nn.Module, merged: Mapping[str, Tensor],
                 heads: Mapping[str, torch.nn.Module], manifest: dict[str, Any], tokenizer_source: str | None = None,
                 per_task_models: bool = True, overwrite: bool = False,
                 extra_files: Mapping[str, Mapping[str, Tensor]] | None = None,
                 extra_writer: Callable[[Path], Any] | None = None) -> Path:
    """Write the flattened checkpoint (see module docstring) and return its path.

    Args:
        backbone: the base backbone module (supplies config and the non-merged tensors).
        merged: merged backbone tensors by parameter name.
        heads: task → head shell (``*ForSequenceClassification`` whose backbone is a stub).
        manifest: method-specific fields; versions and the layout are added here.
        extra_files: more safetensors files to write, name → tensors (e.g. surgery adapters).
        extra_writer: called with the temporary directory to write more files (e.g. PEFT adapters); its return
            value is recorded in the manifest as ``extra``.
    """
    full = {**backbone.state_dict(), **merged}
    canonical: dict[int, str] = {}
    for name, p in backbone.named_parameters(remove_duplicate=False):  # tied weights (e.g. lm_head = embeddings)
        first = canonical.setdefault(id(p), name)
        if first != name and first in merged:
            full[name] = merged[first]
    full = _contiguous({k: v for k, v in full.items() if not k.endswith(("position_ids",))})
    config = copy.deepcopy(backbone.config)
    config.architectures = [type(backbone).__name__]  # the root is exactly this class: AutoModel(ForCausalLM) loads it
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(full, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_source:
            _copy_tokenizer(tokenizer_source, tmp)
        head_tensors, head_info = {}, {}
        for task, head in heads.items():
            hs = head_state(head)
            head_tensors.update({f"{task}/{k}": v for k, v in hs.items()})
            head_info[task] = {"num_labels": head.config.num_labels, "id2label": head.config.id2label,
                               "architecture": type(head).__name__, "params": sorted(hs)}
            if per_task_models:
                d = tmp / "tasks" / task
                d.mkdir(parents=True)
                head.config.architectures = [type(head).__name__]
                head.config.save_pretrained(str(d))
                prefix = head.base_model_prefix
                save_file(_contiguous({**{f"{prefix}.{k}": v for k, v in full.items()}, **hs}),
                          str(d / "model.safetensors"), metadata={"format": "pt"})
                if tokenizer_source:
                    _copy_tokenizer(tokenizer_source, d)
        save_file(_contiguous(head_tensors), str(tmp / HEADS), metadata={"format": "pt"})
        for name, tensors in (extra_files or {}).items():
            save_file(_contiguous(tensors), str(tmp / name), metadata={"format": "pt"})
        extra = extra_writer(tmp) if extra_writer else None
        if extra is not None:
            manifest = {**manifest, "extra": [str(Path(p).relative_to(tmp)) for p in extra]}
        doc = {**manifest, "heads": head_info, "per_task_models": per_task_models, "versions": versions(),
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    log.info("exported merged checkpoint to %s", output_dir)
    return Path(output_dir)


def _json_default(o):
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise MergeInputError(f"{path} is not an adamerge checkpoint: {MANIFEST} is missing")
    return json.loads(p.read_text())


def load_task_model(path: str | Path, task: str, dtype: torch.dtype = torch.float32):
    """A stock ``*ForSequenceClassification`` for ``task`` from an exported checkpoint (works without tasks/)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    manifest = read_manifest(path)
    if task not in manifest["heads"]:
        raise MergeInputError(f"task {task!r} not in checkpoint {path}; tasks: {sorted(manifest['heads'])}")
    info = manifest["heads"][task]
    config = AutoConfig.from_pretrained(str(path), num_labels=info["num_labels"],
                                        id2label={int(k): v for k, v in info["id2label"].items()})
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    prefix = model.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    heads = load_file(str(path / HEADS))
    state.update({k.split("/", 1)[1]: v for k, v in heads.items() if k.startswith(task + "/")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise MergeInputError(f"{path}: task {task!r} checkpoint keys do not match: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()
