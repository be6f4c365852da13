"""Load a base model and its fine-tunes, check they are compatible, and stack their task vectors.

A *pool* holds one frozen copy of the base backbone, each fine-tune's frozen head (the part of a
``*ForSequenceClassification`` model outside ``base_model_prefix``), and the task vectors ``τ_t = θ_t − θ0`` of every
backbone parameter stacked as ``[T, ...]``. No full copy of any fine-tuned model is kept.

Sources may be Hugging Face hub ids, local directories, or single ``.safetensors`` files (which reuse the base config,
or a ``config.json`` next to the file).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)


class FeatureStub(nn.Module):
    """Stands in for the backbone inside a head shell: returns the features it was handed, ignoring its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = None

    def forward(self, *args, **kwargs):  # noqa: D102
        return self.features


def _is_safetensors_file(source: str) -> bool:
    return source.endswith(".safetensors") and Path(source).is_file()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning a corrupt file into an error that names it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise MergeInputError(f"cannot read safetensors file {path}: {e}") from e


def infer_num_labels(state: dict[str, Tensor], prefix: str, hidden_size: int, source: str) -> int:
    """Guess ``num_labels`` of a bare safetensors classifier from its head's output tensor."""
    outs = {t.shape[0] for k, t in state.items() if not k.startswith(prefix + ".") and t.ndim == 2
            and t.shape[0] != hidden_size}
    if len(outs) != 1:
        raise MergeInputError(f"cannot infer num_labels of {source}: put a config.json next to the file")
    return outs.pop()


def load_classifier(source: str, base_config=None, trust_remote_code: bool = False, dtype=torch.float32):
    """Load a ``*ForSequenceClassification`` model from a hub id, a directory or a ``.safetensors`` file."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if _is_safetensors_file(source):
        cfg_path = Path(source).with_name("config.json")
        config = AutoConfig.from_pretrained(str(cfg_path.parent)) if cfg_path.is_file() else None
        if config is None:
            if base_config is None:
                raise MergeInputError(f"{source}: a bare safetensors file needs the base model's config")
            config = base_config.__class__.from_dict(base_config.to_dict())
        state = read_state_dict(source)
        probe = AutoModelForSequenceClassification.from_config(config)
        if not cfg_path.is_file():
            config.num_labels = infer_num_labels(state, probe.base_model_prefix, config.hidden_size, source)
            probe = AutoModelForSequenceClassification.from_config(config)
        prefix = probe.base_model_prefix
        # accept backbone-only key names (as a bare AutoModel saves them)
        expected = set(probe.state_dict())
        state = {(k if k in expected or (prefix + "." + k) not in expected else prefix + "." + k): v
                 for k, v in state.items()}
        missing = sorted(k for k in expected - set(state) if not _is_nonpersistent(probe, k))
        extra = sorted(set(state) - expected)
        if missing or extra:
            raise MergeInputError(f"{source}: state dict does not match {type(probe).__name__}: "
                                  f"missing keys {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                                  f"unexpected keys {extra[:5]}{'…' if len(extra) > 5 else ''}")
        probe.load_state_dict(state, strict=False)
        return probe.to(dtype)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers/safetensors raise many types (OSError, ValueError, SafetensorError, ...)
        raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    return key.endswith(("position_ids", "token_type_ids"))


def state_hash(state: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order (independent of file format)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class TaskVectorPool:
    """Frozen base backbone, per-task head shells and stacked task vectors."""

    backbone: nn.Module
    heads: dict[str, nn.Module]
    task_names: list[str]
    task_vectors: dict[str, Tensor]
    config: object
    base_source: str
    sources: dict[str, str]
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def param_names(self) -> list[str]:
        return list(self.task_vectors)

    def base_params(self) -> dict[str, Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.task_vectors}

    def finetuned_state(self, task: str) -> dict[str, Tensor]:
        """Rebuild fine-tune ``task``'s backbone weights (θ0 + τ_t)."""
        i = self.task_names.index(task)
        base = self.base_params()
        return {n: base[n].detach() + tv[i].to(base[n].dtype) for n, tv in self.task_vectors.items()}


def _check_finite(state: dict[str, Tensor], source: str) -> None:
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MergeInputError(f"model {source!r}: tensor {k!r} contains NaN or Inf")


def load_pool(base: str, models: dict[str, str], tv_dtype: torch.dtype | None = None,
              trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> TaskVectorPool:
    """Load ``base`` and each fine-tune in ``models`` (task name → source) into a :class:`TaskVectorPool`.

    Args:
        base: the pretrained model the fine-tunes started from.
        models: task name → fine-tuned sequence classifier (hub id, directory or ``.safetensors`` file).
        tv_dtype: storage dtype of the stacked task vectors (e.g. ``torch.bfloat16`` halves their memory);
            defaults to the model dtype. Merging always computes in the model dtype.
        trust_remote_code: passed to ``transformers``; off unless the user sets it.
        dtype: dtype the models are loaded in.
    """
    if not models:
        raise MergeInputError("models: at least one fine-tuned model is required")
    base_model = load_classifier(base, trust_remote_code=trust_remote_code, dtype=dtype)
    prefix = base_model.base_model_prefix
    backbone = getattr(base_model, prefix)
    backbone.requires_grad_(False).eval()
    base_params = dict(backbone.named_parameters())
    base_state = {n: p.detach() for n, p in base_params.items()}
    _check_finite(base_state, base)
    hashes = {"base": state_hash(base_model.state_dict())}
    tv_dtype = tv_dtype or dtype
    stacks: dict[str, list[Tensor]] = {n: [] for n in base_params}
    heads: dict[str, nn.Module] = {}
    for task, source in models.items():
        ft = load_classifier(source, base_config=base_model.config, trust_remote_code=trust_remote_code, dtype=dtype)
        if type(ft) is not type(base_model) or ft.base_model_prefix != prefix:
            raise MergeInputError(f"model {task!r} ({source}) is a {type(ft).__name__}, base is a "
                                  f"{type(base_model).__name__}: architectures differ")
        ft_backbone = dict(getattr(ft, prefix).named_parameters())
        missing, extra = sorted(set(base_params) - set(ft_backbone)), sorted(set(ft_backbone) - set(base_params))
        if missing or extra:
            raise MergeInputError(f"model {task!r} ({source}): backbone keys differ from the base: "
                                  f"missing {missing[:5]}, extra {extra[:5]}")
        hashes[task] = state_hash(ft.state_dict())
        ft_state = {n: p.detach() for n, p in ft_backbone.items()}
        _check_finite(ft_state, source)
        zero = True
        for n, p in ft_state.items():
            if p.shape != base_state[n].shape:
                hint = ""
                if getattr(ft.config, "vocab_size", None) != getattr(base_model.config, "vocab_size", None):
                    hint = f" (vocab size {ft.config.vocab_size} vs base {base_model.config.vocab_size})"
                raise MergeInputError(f"model {task!r} ({source}): tensor {n!r} has shape {tuple(p.shape)}, "
                                      f"base has {tuple(base_state[n].shape)}{hint}")
            tv = (p - base_state[n]).to(tv_dtype)
            zero = zero and not bool(tv.any())
            stacks[n].append(tv)
        if zero:
            log.warning("model %r (%s) is identical to the base: its task vector is zero", task, source)
        ft.requires_grad_(False).eval()
        setattr(ft, prefix, FeatureStub())  # drop the fine-tuned backbone: keep only the head shell
        heads[task] = ft
    task_vectors = {n: torch.stack(s) for n, s in stacks.items()}
    n_el = sum(t.numel() for t in task_vectors.values())
    log.info("pool: %d tasks, %d tensors, %.1fM task-vector elements (%.1f MiB)", len(models), len(task_vectors),
             n_el / 1e6, n_el * task_vectors[next(iter(task_vectors))].element_size() / 2**20)
    del base_model
    return TaskVectorPool(backbone=backbone, heads=heads, task_names=list(models), task_vectors=task_vectors,
                          config=backbone.config, base_source=base, sources=dict(models), hashes=hashes)


def n_elements(tensors: dict[str, Tensor]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())
