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
    file suffix, or ``a/b`` whose first component ``a`` exists here — is a path."""
    text = str(source)
    first = text.split("/", 1)[0]
    return (
        Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith((".safetensors", ".bin", ".json"))
        or ("/" in text and bool(first) and Path(first).expanduser().exists())
    )


def check_source(source: str, what: str) -> None:
    """A model source must exist before any model is loaded: a local path here, else a model on the Hub. ``what``
    (e.g. "fine-tune 'spam'") and the source are named at once — no retries against a Hub that cannot answer."""
    if Path(source).expanduser().exists():
        return
    if names_local_path(source):
        raise MergeInputError(f"{what}: {source} does not exist")
    problem = hub_problem(source)
    if problem:
        raise MergeInputError(f"{what}: {source} is not a local path, and {problem}")


def hub_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be loaded from the Hub (offline, unreachable, no such model), or None when it can or
    when only loading will tell (a gated or private model: transformers reports it)."""
    import os

    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on"):
        return "the Hub is off here (HF_HUB_OFFLINE): give a local directory"
    try:
        model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        return "the Hub has no such model (check the spelling; log in for a private one)"
    except HfHubHTTPError:
        return None  # gated, rate-limited, ...: loading says what it needs
    except Exception as e:  # no network, DNS, timeout (the HTTP client's own errors), a malformed id
        return f"the Hub cannot be reached ({type(e).__name__}: {e}): give a local directory"
    return None


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
