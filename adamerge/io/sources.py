"""Model sources: local path or hub id, existence checks, content hashes, LoRA adapter detection, state-dict files."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from adamerge.errors import MergeInputError


@contextmanager
def _naming(what: str):
    """Prefix a loading error with the model it concerns (``base``, ``fine-tune 'spam'``)."""
    try:
        yield
    except MergeInputError as e:
        raise MergeInputError(f"{what}: {e}") from e


def names_local_path(source: str | Path) -> bool:
    """Whether a model source means a local path rather than a hub id. A hub id has the form ``name`` or
    ``owner/name``; anything else — existing, absolute, ``./``, ``../``, ``~``, more than one ``/``, a backslash, a
    file suffix — is a path."""
    text = str(source)
    return (
        Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith((".safetensors", ".bin", ".json"))
    )


def check_source(source: str, what: str) -> None:
    """A model source that names a local path must exist: ``what`` (e.g. "fine-tune 'spam'") and the path are named
    at once, before any model is loaded."""
    if names_local_path(source) and not Path(source).expanduser().exists():
        raise MergeInputError(f"{what}: {source} does not exist")


def state_hash(state: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order (independent of file format)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


def is_lora_adapter(source: str) -> bool:
    return Path(source).is_dir() and (Path(source) / "adapter_config.json").is_file()


def is_safetensors_file(source: str) -> bool:
    return source.endswith(".safetensors") and Path(source).is_file()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning a corrupt file into an error that names it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise MergeInputError(f"cannot read safetensors file {path}: {e}") from e
