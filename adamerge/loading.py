"""Load an exported merge for prediction: ``load_merged(path).predict(task, **inputs)``.

Works for every export: the merged encoder (``AutoModel``), each task's head from ``heads.safetensors``, and — when
the merge was followed by Representation Surgery — the per-task adapters from ``surgery_adapters.safetensors``; for
WEMoE, the routers and routed MLP task vectors from ``wemoe.safetensors`` (hooked into the encoder's MLPs).
Only ``transformers`` and ``safetensors`` are used to read the files; no pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.export import HEADS, read_manifest
from adamerge.parametrize.surgery import SurgeryAdapter
from adamerge.pool import FeatureStub, apply_head


class MergedCheckpoint(nn.Module):
    """An exported merge: one encoder, one head (and optional adapter) per task."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], adapters: dict[str, SurgeryAdapter] | None,
                 feature: str, manifest: dict, routing: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, nn.ModuleDict(heads)
        self.adapters = nn.ModuleDict(adapters or {})
        self.feature, self.manifest = feature, manifest
        self.routing = routing  # WEMoE: routers + routed MLP task vectors, hooked into the backbone

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    @torch.no_grad()
    def predict(self, task: str, **inputs: Tensor) -> Tensor:
        """Logits of ``task`` on tokenized ``inputs``."""
        from adamerge.methods.surgery import feature_field, replace_field

        if task not in self.heads:
            raise MergeInputError(f"task {task!r} not in this checkpoint; tasks: {self.tasks}")
        if self.routing is not None:
            with self.routing.context(inputs.get("attention_mask")):
                feats = self.backbone(**inputs)
        else:
            feats = self.backbone(**inputs)
        if task in self.adapters:
            field = feature_field(feats, self.feature)
            feats = replace_field(feats, field, self.adapters[task](feats[field]))
        return apply_head(self.heads[task], feats, inputs)


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32) -> MergedCheckpoint:
    """Load the checkpoint at ``path`` (written by ``adamerge fit``/``merge``) for per-task prediction."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    path = Path(path)
    manifest = read_manifest(path)
    backbone = AutoModel.from_pretrained(str(path), dtype=dtype).eval()
    head_tensors = load_file(str(path / HEADS))
    heads = {}
    for task, info in manifest["heads"].items():
        config = AutoConfig.from_pretrained(str(path), num_labels=info["num_labels"],
                                            id2label={int(k): v for k, v in info["id2label"].items()})
        shell = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        setattr(shell, shell.base_model_prefix, FeatureStub())
        state = {k.split("/", 1)[1]: v for k, v in head_tensors.items() if k.startswith(task + "/")}
        shell.load_state_dict(state, strict=True)
        heads[task] = shell.eval()
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
    return MergedCheckpoint(backbone, heads, adapters, feature, manifest, routing).eval()
