"""Load an exported merge for prediction: ``load_merged(path).predict(task, **inputs)``.

Works for every export and model kind: the merged backbone (``AutoModel``; the kind's class), each task's head from
``heads.safetensors`` (rebuilt by the kind: a classification head, a CLIP zero-shot head), and — when
the merge was followed by Representation Surgery — the per-task adapters from ``surgery_adapters.safetensors``; for
WEMoE, the routers and routed MLP task vectors from ``wemoe.safetensors`` (hooked into the encoder's MLPs); with
per-task BatchNorm statistics (``task_buffers.safetensors``), each task's rows run with its own.
Only ``transformers`` and ``safetensors`` are used to read the files; no pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.errors import MergeInputError
from adamerge.export import HEADS, manifest_kind, read_manifest, task_buffers
from adamerge.kinds import get_kind
from adamerge.parametrize.surgery import SurgeryAdapter


class MergedCheckpoint(nn.Module):
    """An exported merge: one encoder, one head (and optional adapter) per task."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], adapters: dict[str, SurgeryAdapter] | None,
                 feature: str, manifest: dict, routing: nn.Module | None = None,
                 buffers: dict[str, dict[str, Tensor]] | None = None) -> None:
        super().__init__()
        self.kind = get_kind(manifest_kind(manifest))
        self.backbone, self.heads = backbone, nn.ModuleDict(heads)
        self.adapters = nn.ModuleDict(adapters or {})
        self.feature, self.manifest = feature, manifest
        self.routing = routing  # WEMoE: routers + routed MLP task vectors, hooked into the backbone
        self.task_buffers = buffers or {}  # task → its own backbone buffers (BatchNorm statistics)

    @property
    def tasks(self) -> list[str]:
        if self.kind.per_task_heads:
            return list(self.heads)
        return [s["task"] for s in self.manifest["sources"]]  # one merged model (its own logits) serves them all

    @torch.no_grad()
    def predict(self, task: str, **inputs: Tensor) -> Tensor:
        """Logits of ``task`` on its ``inputs`` (tokenized text, or ``pixel_values`` for image kinds)."""
        from adamerge.methods.surgery import feature_field, replace_field

        if task not in self.tasks:
            raise MergeInputError(f"task {task!r} not in this checkpoint; tasks: {self.tasks}")
        own = self.task_buffers.get(task)
        if own:  # plain tensors, not module buffers: moved to the backbone's device here
            device = next(self.backbone.parameters()).device
            own = {n: v.to(device) for n, v in own.items()}

        def backbone(**kw):
            return functional_call(self.backbone, own, args=(), kwargs=kw) if own else self.backbone(**kw)

        if self.routing is not None:
            with self.routing.context(inputs):
                feats = backbone(**inputs)
        else:
            feats = backbone(**inputs)
        if task in self.adapters:
            field = feature_field(feats, self.feature)
            feats = replace_field(feats, field, self.adapters[task](feats[field]))
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
    adapters, feature = None, "auto"
    surgery = manifest.get("surgery")
    if surgery:
        tensors = load_file(str(path / surgery["adapters"]))
        adapters = {}
        for task in manifest["heads"]:
            down = tensors[f"{task}/down.weight"]
            a = SurgeryAdapter(down.shape[1], down.shape[0])
            a.load_state_dict({"down.weight": down, "up.weight": tensors[f"{task}/up.weight"]})
            adapters[task] = a.to(dtype).eval()
        feature = surgery["feature"]
    routing = None
    if manifest.get("wemoe"):
        from adamerge.parametrize.routing import RoutedMLPs

        info = manifest["wemoe"]
        modules = dict(backbone.named_modules())
        routing = RoutedMLPs.from_tensors(info, load_file(str(path / info["file"])),
                                          {n: modules[n].in_features for n in info["modules"]}).to(dtype)
        routing.attach(backbone)
    buffers = {t: {n: v.to(dtype) if v.is_floating_point() else v for n, v in task_buffers(path, t, manifest).items()}
               for t in manifest["heads"]}
    return MergedCheckpoint(backbone, heads, adapters, feature, manifest, routing,
                            {t: b for t, b in buffers.items() if b}).eval()
