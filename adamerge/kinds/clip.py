"""``clip``: CLIP image classification as AdaMerging, Surgery and Concrete were published on; SigLIP and SigLIP 2.

The merged backbone is the **vision tower** (a ``CLIPVisionModel``; ``SiglipVisionModel``, ``Siglip2VisionModel``).
The base must be the full dual encoder (``CLIPModel``, e.g. ``openai/clip-vit-base-patch32``; ``SiglipModel``, e.g.
``google/siglip-base-patch16-224``; ``Siglip2Model``, whose tower also reads the processor's NaFlex
``pixel_attention_mask`` and ``spatial_shapes``): its text tower builds each task's **zero-shot head** once, as the
papers do — for every class, the text embeddings of the class name in each prompt template are L2-normalised,
averaged and normalised again; logits are ``exp(logit_scale) · normalize(visual_projection(pooled)) @ Wᵀ`` (SigLIP:
no projection, plus its ``logit_bias``; prompts padded to the text tower's length, as SigLIP was trained). The heads
(with the base's projection, logit scale and bias) are frozen. Fine-tunes may be vision towers (``CLIPVisionModel``,
as FusionBench publishes them; ``CLIPVisionModelWithProjection``; the SigLIP towers) or full dual-encoder
checkpoints; only their vision tower is read (a fine-tuned projection or text tower is ignored: the heads come from
the base).

Class names and templates come from the ``heads`` option, per task::

    heads:
      mnist: {classnames: ["0", "1", ...], templates: mnist}           # a template set by name
      dtd: {dataset: {path: tanganke/dtd, split: test, label_column: label}}   # names of a ClassLabel column

``templates`` is a list of strings with one ``{}`` or the name of a set in :data:`TEMPLATES`; by default the set of
the task's name when there is one (the eight tasks of the benchmark), else ``["a photo of a {}."]``.

Export: the root is the merged vision tower (``AutoModel.from_pretrained`` loads it); ``heads.safetensors``
holds per task ``<task>/visual_projection.weight`` (SigLIP: the identity), ``<task>/weight`` (the ``[C, d]`` zero-shot
matrix), ``<task>/logit_scale`` and, for SigLIP, ``<task>/logit_bias``. Classify with stock ``transformers``::

    vision = AutoModel.from_pretrained(out)
    inputs = AutoImageProcessor.from_pretrained(out)(images=images, return_tensors="pt")  # SigLIP 2: 3 tensors
    heads = safetensors.torch.load_file(f"{out}/heads.safetensors")
    emb = vision(**inputs).pooler_output @ heads["mnist/visual_projection.weight"].T
    logits = heads["mnist/logit_scale"] * (emb / emb.norm(dim=-1, keepdim=True)) @ heads["mnist/weight"].T
    logits = logits + heads.get("mnist/logit_bias", 0)

or with ``adamerge.load_merged(out).predict("mnist", pixel_values=x)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.io.sources import is_safetensors_file, read_state_dict
from adamerge.kinds.base import ModelKind

# Prompt templates per task, in the style of the CLIP paper's zero-shot prompts for these datasets.
TEMPLATES: dict[str, list[str]] = {
    "default": ["a photo of a {}."],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "cars": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    "resisc45": [
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "satellite photo of {}.",
        "aerial photo of {}.",
        "satellite view of {}.",
        "aerial view of {}.",
        "satellite imagery of a {}.",
        "aerial imagery of a {}.",
        "satellite photo of a {}.",
        "aerial photo of a {}.",
        "satellite view of a {}.",
        "aerial view of a {}.",
        "satellite imagery of the {}.",
        "aerial imagery of the {}.",
        "satellite photo of the {}.",
        "aerial photo of the {}.",
        "satellite view of the {}.",
        "aerial view of the {}.",
    ],
    "eurosat": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    "svhn": ['a photo of the number: "{}".'],
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "mnist": ['a photo of the number: "{}".'],
    "dtd": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
}
TEMPLATES["stanford_cars"] = TEMPLATES["cars"]


class ZeroShotHead(nn.Module):
    """Frozen zero-shot classifier on a vision tower's pooled output: project, normalise, scaled cosine with the
    class embeddings ``weight`` ``[C, d]`` (``bias``: plus SigLIP's ``logit_bias``)."""

    def __init__(self, hidden_size: int, projection_dim: int, num_classes: int, bias: bool = False) -> None:
        super().__init__()
        self.visual_projection = nn.Linear(hidden_size, projection_dim, bias=False)
        self.weight = nn.Parameter(torch.zeros(num_classes, projection_dim))
        self.logit_scale = nn.Parameter(torch.ones(()))  # exp of the model's logit_scale
        self.logit_bias = nn.Parameter(torch.zeros(())) if bias else None

    def forward(self, pooled: Tensor) -> Tensor:
        emb = self.visual_projection(pooled)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * emb @ self.weight.T
        return logits if self.logit_bias is None else logits + self.logit_bias


@dataclass(frozen=True)
class DualEncoder:
    """A family of zero-shot dual encoders this kind merges: its ``transformers`` classes and how its zero-shot
    logits are formed."""

    full: str  # the dual encoder (the base)
    vision: str  # its vision tower (the merged backbone; fine-tunes)
    vision_config: str
    projection: bool  # a visual_projection after the tower's pooled output (CLIP), else none (SigLIP)
    bias: bool  # a logit_bias added to the scaled cosine (SigLIP)
    pad_to_max_length: bool  # prompts padded to the text tower's length, input_ids only (as SigLIP was trained)


FAMILIES = {
    "clip": DualEncoder(
        "CLIPModel", "CLIPVisionModel", "CLIPVisionConfig", projection=True, bias=False, pad_to_max_length=False
    ),
    "siglip": DualEncoder(
        "SiglipModel", "SiglipVisionModel", "SiglipVisionConfig", projection=False, bias=True, pad_to_max_length=True
    ),
    # SigLIP 2 (NaFlex): the tower also reads the processor's pixel_attention_mask and spatial_shapes
    "siglip2": DualEncoder(
        "Siglip2Model", "Siglip2VisionModel", "Siglip2VisionConfig", projection=False, bias=True, pad_to_max_length=True
    ),
}
MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "siglip2": "siglip2",
    "siglip2_vision_model": "siglip2",
}


def family_of(config, source: str) -> DualEncoder:
    """The :class:`DualEncoder` of a (dual-encoder or vision-tower) config, or an error naming the model type."""
    family = MODEL_TYPES.get(getattr(config, "model_type", None))
    if family is None:
        raise MergeInputError(
            f"{source} is a {getattr(config, 'model_type', type(config).__name__)!r} model, not a "
            f"zero-shot dual encoder (task_type clip takes {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[family]


def _cls(name: str):
    import transformers

    return getattr(transformers, name)


def resolve_templates(task: str, templates) -> list[str]:
    if templates is None:
        templates = task if task in TEMPLATES else "default"
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise MergeInputError(
                f"heads.{task}.templates: unknown template set {templates!r}; sets: "
                f"{', '.join(sorted(TEMPLATES))} (or give a list of strings with one '{{}}')"
            )
        templates = TEMPLATES[templates]
    templates = list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise MergeInputError(f"heads.{task}.templates: every template needs exactly one '{{}}'; got {bad or '[]'}")
    return templates


def class_names(task: str, spec: Mapping[str, Any]) -> list[str]:
    """The class names of ``task``: ``classnames``, or the names of a ``ClassLabel`` column of ``dataset``."""
    unknown = sorted(set(spec) - {"classnames", "templates", "dataset"})
    if unknown:
        raise MergeInputError(f"heads.{task}: unknown fields {unknown}; allowed: classnames, templates, dataset")
    if spec.get("classnames"):
        return [str(c) for c in spec["classnames"]]
    ds_spec = spec.get("dataset")
    if not ds_spec:
        raise MergeInputError(
            f"heads.{task}: give its class names (classnames: [...]) or a dataset whose label "
            "column is a ClassLabel (dataset: {path: ..., label_column: label})"
        )
    import datasets

    from adamerge.io.datasets import open_dataset

    column = ds_spec.get("label_column", "label")
    ds = open_dataset(ds_spec["path"], ds_spec.get("split", "train"), ds_spec.get("name"), task)
    feature = ds.features.get(column)
    if not isinstance(feature, datasets.ClassLabel):
        raise MergeInputError(
            f"heads.{task}.dataset: column {column!r} of {ds_spec['path']} is not a ClassLabel "
            f"({type(feature).__name__}); give classnames: [...]"
        )
    return [n.replace("_", " ") for n in feature.names]


@torch.no_grad()
def zero_shot_weights(
    clip_model: nn.Module, tokenizer, classnames: list[str], templates: list[str], max_length: int | None = None
) -> Tensor:
    """``[C, d]``: per class, the mean of the L2-normalised text embeddings of its prompts, normalised again.
    ``max_length``: prompts padded to it and read by ``input_ids`` alone (SigLIP's text tower, trained so)."""
    rows = []
    for name in classnames:
        prompts = [t.format(name) for t in templates]
        if max_length is None:
            enc = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        else:
            enc = {
                "input_ids": tokenizer(
                    prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
                )["input_ids"]
            }
        emb = clip_model.get_text_features(**enc)
        emb = getattr(emb, "pooler_output", emb)  # transformers 5 may return a ModelOutput
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


class CLIP(ModelKind):
    name = "clip"
    modality = "image"
    feature_fields = ("pooler_output",)
    pipeline_tag = "zero-shot-image-classification"

    def load(
        self,
        source: str,
        base_config=None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        role: str = "fine-tune",
    ) -> nn.Module:
        from transformers import AutoConfig

        if is_safetensors_file(source):
            if role == "base" or base_config is None:
                raise MergeInputError(
                    f"{source}: a bare safetensors file can only be a fine-tune (the base must be a "
                    "CLIPModel or SiglipModel directory or hub id)"
                )
            model = _cls(family_of(base_config, source).vision)(base_config)
            expected = set(model.state_dict())
            state = {}
            for k, v in read_state_dict(source).items():  # a vision tower's or a dual encoder's names, any version
                for cand in (k, k.removeprefix("vision_model."), "vision_model." + k):
                    if cand in expected:
                        state[cand] = v
                        break
            missing, _ = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing:
                raise MergeInputError(f"{source}: no {type(model).__name__} vision tower (missing {missing[:3]})")
            return model.to(dtype)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as e:  # see HeadedKind.load
            raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e
        family = family_of(config, source)
        is_vision = isinstance(config, _cls(family.vision_config))
        if role == "base" and is_vision:
            raise MergeInputError(
                f"{source} is a vision tower only: task_type clip builds the zero-shot heads with "
                f"the base's text tower, so the base must be the full {family.full} (e.g. "
                "openai/clip-vit-base-patch32 or google/siglip-base-patch16-224)"
            )
        try:
            if is_vision:  # also reads CLIPVisionModelWithProjection files
                return _cls(family.vision).from_pretrained(source, dtype=dtype)
            model = _cls(family.full).from_pretrained(source, dtype=dtype)
        except Exception as e:
            raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e
        if role == "base":
            return model
        return self.backbone_of(model)

    def backbone_of(self, model: nn.Module) -> nn.Module:
        family = family_of(model.config, type(model).__name__)
        if not isinstance(model, _cls(family.full)):
            return model
        if isinstance(model.vision_model, _cls(family.vision)):  # transformers 5: the tower is a *VisionModel
            return model.vision_model
        vision = _cls(family.vision)(model.config.vision_config)  # transformers 4: wrap the shared transformer
        vision.vision_model = model.vision_model
        return vision.to(next(model.parameters()).dtype)

    def split(self, model: nn.Module):
        return self.backbone_of(model), None

    def build_heads(
        self,
        base_model: nn.Module,
        base_source: str,
        tasks: list[str],
        options: Mapping[str, Any] | None,
        dtype: torch.dtype,
    ) -> dict[str, nn.Module]:
        options = dict(options or {})
        extra = sorted(set(options) - set(tasks))
        if extra:
            raise MergeInputError(f"heads: {extra} are not tasks of this merge; tasks: {tasks}")
        missing = [t for t in tasks if t not in options]
        if missing:
            raise MergeInputError(
                f"heads: task_type clip needs each task's class names; missing for {missing} "
                "(heads: {task: {classnames: [...]}})"
            )
        tokenizer = self.tokenizer(base_source)
        family = family_of(base_model.config, base_source)
        hidden = base_model.config.vision_config.hidden_size
        max_length = base_model.config.text_config.max_position_embeddings if family.pad_to_max_length else None
        heads = {}
        for task in tasks:
            spec = options[task] or {}
            names = class_names(task, spec)
            templates = resolve_templates(task, spec.get("templates"))
            head = ZeroShotHead(
                hidden, base_model.config.projection_dim if family.projection else hidden, len(names), bias=family.bias
            )
            with torch.no_grad():
                head.visual_projection.weight.copy_(
                    base_model.visual_projection.weight if family.projection else torch.eye(hidden)
                )
                head.weight.copy_(zero_shot_weights(base_model, tokenizer, names, templates, max_length))
                head.logit_scale.copy_(base_model.logit_scale.exp().reshape(()))
                if family.bias:
                    head.logit_bias.copy_(base_model.logit_bias.reshape(()))
            head.classnames, head.templates = names, templates
            heads[task] = head.to(dtype).requires_grad_(False).eval()
        return heads

    @staticmethod
    def tokenizer(source: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise MergeInputError(f"base {source}: no tokenizer to build the zero-shot heads with: {e}") from e

    def head_logits(self, head, features, inputs):
        return head(features.pooler_output)

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        return (
            "The merged vision tower loads with stock `transformers`; each task's zero-shot head (the base's "
            "visual projection, the class-name embeddings, the logit scale and, for SigLIP, the logit bias) is in "
            "`heads.safetensors`:\n\n"
            "```python\nimport torch\nfrom huggingface_hub import hf_hub_download\n"
            "from safetensors.torch import load_file\nfrom transformers import AutoImageProcessor, AutoModel\n"
            f'vision = AutoModel.from_pretrained("{repo}")\n'
            f'inputs = AutoImageProcessor.from_pretrained("{repo}")(images=images, return_tensors="pt")\n'
            f'heads = load_file(hf_hub_download("{repo}", "heads.safetensors"))\n'
            f'emb = vision(**inputs).pooler_output @ heads["{task}/visual_projection.weight"].T\n'
            f'logits = heads["{task}/logit_scale"] * torch.nn.functional.normalize(emb, dim=-1) '
            f'@ heads["{task}/weight"].T + heads.get("{task}/logit_bias", 0)\n```\n'
        )

    def head_info(self, head: nn.Module) -> dict[str, Any]:
        names = list(getattr(head, "classnames", [str(i) for i in range(head.weight.shape[0])]))
        return {
            "num_labels": head.weight.shape[0],
            "id2label": dict(enumerate(names)),
            "architecture": "ZeroShotHead",
            "templates": list(getattr(head, "templates", [])),
        }

    def head_from_tensors(self, root, info, tensors, dtype):
        proj, weight = tensors["visual_projection.weight"], tensors["weight"]
        head = ZeroShotHead(proj.shape[1], proj.shape[0], weight.shape[0], bias="logit_bias" in tensors)
        head.load_state_dict(dict(tensors), strict=True)
        head.classnames = [info["id2label"][k] for k in sorted(info["id2label"], key=int)]
        head.templates = info.get("templates", [])
        return head.to(dtype)
