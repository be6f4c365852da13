"""The export's manifest (``merge_manifest.json``): file names, reading, the model kind it records, per-task buffers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import MergeInputError

MANIFEST = "merge_manifest.json"


HEADS = "heads.safetensors"


TASK_BUFFERS = "task_buffers.safetensors"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        adamerge_version = version("adamerge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        adamerge_version = "unknown"
    return {"adamerge": adamerge_version, "torch": torch.__version__, "transformers": transformers.__version__}


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


def task_buffers(path: str | Path, task: str, manifest: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """The backbone tensors of ``task``'s own in an export (its BatchNorm statistics, ``task_buffers.safetensors``),
    by backbone name; empty when the export has none."""
    from safetensors.torch import load_file

    manifest = read_manifest(path) if manifest is None else manifest
    info = manifest.get("task_buffers")
    if not info or task not in info["tasks"]:
        return {}
    tensors = load_file(str(Path(path) / info["file"]))
    return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(task + "/")}


def manifest_kind(manifest: Mapping[str, Any]) -> str:
    """The model kind of an export (manifests before kinds were recorded: ``seq_cls`` when it has heads, else
    ``causal_lm``)."""
    return manifest.get("task_type") or ("seq_cls" if manifest.get("heads") else "causal_lm")
