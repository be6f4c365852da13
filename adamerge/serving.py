"""Serve an exported merge: ``load_merged(path).predict(task, **inputs)``, and ``load_task_model`` for one task's
stock ``transformers`` model.

Works for every export and model kind: the merged backbone (``AutoModel``; the kind's class), each task's head from
``heads.safetensors`` (rebuilt by the kind: a classification head, a CLIP zero-shot head), and whatever the method's
export extension serves (:mod:`adamerge.io.extensions`: Surgery's per-task adapters, WEMoE's routers); with per-task
BatchNorm statistics (``task_buffers.safetensors``), each task's rows run with its own. Imports no Lightning.
Only ``transformers`` and ``safetensors`` are used to read the files; no pickle.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.errors import MergeInputError
from adamerge.io.extensions import NoHook, extensions_of
from adamerge.io.manifest import HEADS, manifest_kind, read_manifest, task_buffers
from adamerge.io.safetensors import read_weights
from adamerge.kinds import get_kind


class MergedCheckpoint(nn.Module):
    """An exported merge: one encoder, one head per task, and the serving hooks of the method's export extensions
    (:mod:`adamerge.io.extensions`: Surgery's adapters, WEMoE's routers)."""

    def __init__(
        self,
        backbone: nn.Module,
        heads: dict[str, nn.Module],
        manifest: dict,
        hooks: list[NoHook] | None = None,
        buffers: dict[str, dict[str, Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.kind = get_kind(manifest_kind(manifest))
        self.backbone, self.heads = backbone, nn.ModuleDict(heads)
        self.manifest = manifest
        self.hooks = nn.ModuleList(hooks or [])  # modules: their tensors move with the checkpoint (.to(device))
        self.task_buffers = buffers or {}  # task → its own backbone buffers (BatchNorm statistics)

    @property
    def tasks(self) -> list[str]:
        if self.kind.per_task_heads:
            return list(self.heads)
        return [s["task"] for s in self.manifest["sources"]]  # one merged model (its own logits) serves them all

    @torch.no_grad()
    def predict(self, task: str, **inputs: Tensor) -> Tensor:
        """Logits of ``task`` on its ``inputs`` (tokenized text, or ``pixel_values`` for image kinds)."""
        if task not in self.tasks:
            raise MergeInputError(f"task {task!r} not in this checkpoint; tasks: {self.tasks}")
        own = self.task_buffers.get(task)
        if own:  # plain tensors, not module buffers: moved to the backbone's device here
            device = next(self.backbone.parameters()).device
            own = {n: v.to(device) for n, v in own.items()}
        with ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.context(inputs))
            feats = functional_call(self.backbone, own, args=(), kwargs=inputs) if own else self.backbone(**inputs)
        for hook in self.hooks:
            feats = hook.features(task, feats)
        return self.kind.head_logits(self.heads[task] if task in self.heads else None, feats, inputs)


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32) -> MergedCheckpoint:
    """Load the checkpoint at ``path`` (written by ``adamerge fit``/``merge``) for per-task prediction."""
    path = Path(path)
    manifest = read_manifest(path)
    kind = get_kind(manifest_kind(manifest))
    backbone = kind.load_backbone(path, dtype).eval()
    head_tensors = load_file(str(path / HEADS))
    heads = {}
    for task, info in manifest["heads"].items():
        state = {k.split("/", 1)[1]: v for k, v in head_tensors.items() if k.startswith(task + "/")}
        heads[task] = kind.head_from_tensors(path, info, state, dtype).eval()
    hooks = [ext.serve(path, manifest[ext.key], backbone, dtype) for ext in extensions_of(manifest)]
    buffers = {
        t: {n: v.to(dtype) if v.is_floating_point() else v for n, v in task_buffers(path, t, manifest).items()}
        for t in manifest["heads"]
    }
    return MergedCheckpoint(backbone, heads, manifest, hooks, {t: b for t, b in buffers.items() if b}).eval()


def load_task_model(path: str | Path, task: str, dtype: torch.dtype = torch.float32):
    """A stock ``AutoModelFor<Task>`` (sequence or image classification) for ``task`` from an exported checkpoint
    (works without ``tasks/``)."""
    from safetensors.torch import load_file

    from adamerge.kinds import get_kind

    path = Path(path)
    manifest = read_manifest(path)
    if task not in manifest["heads"]:
        raise MergeInputError(f"task {task!r} not in checkpoint {path}; tasks: {sorted(manifest['heads'])}")
    kind = get_kind(manifest_kind(manifest))
    heads = load_file(str(path / HEADS))
    head = {k.split("/", 1)[1]: v for k, v in heads.items() if k.startswith(task + "/")}
    return kind.task_model(
        path, task, manifest["heads"][task], {**read_weights(path), **task_buffers(path, task)}, head, dtype
    )
