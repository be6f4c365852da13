"""The model-kind interface: everything that differs between sequence classifiers, causal LMs, image classifiers
and CLIP sits behind :class:`ModelKind`, one module per kind (``adamerge/kinds/<kind>.py``).

A kind says how to load a full model, which part of it is merged (the *backbone*) and which part stays per task (the
*head*), how a head turns backbone outputs into logits, which backbone output is "the feature" (Surgery, feature
objectives), which preprocessor its inputs need (tokenizer or image processor), and how an export is read back.
The rest of adamerge (pool, merged model, methods, export, loading) calls these methods and never branches on the
kind's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError


class FeatureStub(nn.Module):
    """Stands in for the backbone inside a head shell: returns the features it was handed, ignoring its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = None

    def forward(self, *args, **kwargs):  # noqa: D102
        return self.features


def apply_head(head: nn.Module, features, inputs) -> Tensor:
    """Logits of a head shell (a ``*For<Task>`` model whose backbone is a :class:`FeatureStub`) on backbone
    ``features`` of ``inputs``: the model's own head code runs, the backbone does not."""
    stub = getattr(head, head.base_model_prefix)
    stub.features = features
    try:
        return head(**inputs).logits
    finally:
        stub.features = None


def _fill_decoder_inputs(make, model: nn.Module, args, kwargs):
    """Forward pre-hook of :func:`default_decoder_inputs`."""
    if any(kwargs.get(k) is not None for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")):
        return None
    ids = make(model, kwargs)
    return None if ids is None else (args, {**kwargs, "decoder_input_ids": ids})


def default_decoder_inputs(model: nn.Module, make) -> nn.Module:
    """``model`` (an encoder-decoder, in place), called without decoder inputs (ids, embeddings or labels), gets
    ``decoder_input_ids = make(model, kwargs)`` (``make`` returns None: called as it is). Every call of it — training,
    export checks, ``load_merged`` — then decodes as the kind means it to."""
    model.register_forward_pre_hook(partial(_fill_decoder_inputs, make), with_kwargs=True)
    return model


class ModelKind:
    """One kind of model. Subclasses set the class attributes and override what differs.

    Attributes:
        name: the ``task_type`` value that selects this kind.
        per_task_heads: each task keeps its own frozen head; False: the whole model is merged and its logits are the
            backbone's (causal LMs).
        modality: ``text`` (inputs from a tokenizer) or ``image`` (``pixel_values`` from an image processor).
        feature_fields: backbone output fields that hold "the feature" the heads read, in order of preference.
        peft_task_type: PEFT's ``task_type`` of the kind's adapters (exported LoRA merges); None: not supported.
        evaluated_on: what ``adamerge evaluate`` scores: ``labels`` (accuracy and macro-F1 of the classes),
            ``tokens`` (next-token NLL of each task's text, causal LMs), ``answers`` (accuracy and macro-F1 of the
            first output token among each class's answer word, seq2seq LMs).
    """

    name: ClassVar[str] = ""
    per_task_heads: ClassVar[bool] = True
    modality: ClassVar[str] = "text"
    feature_fields: ClassVar[tuple[str, ...]] = ("pooler_output", "last_hidden_state")
    peft_task_type: ClassVar[str | None] = None
    pipeline_tag: ClassVar[str] = "feature-extraction"  # the model card's Hub pipeline tag
    evaluated_on: ClassVar[str | None] = "labels"
    auto_class_name: ClassVar[str] = ""  # the transformers Auto class of the kind's full models

    def auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class_name)

    # -- loading ------------------------------------------------------------------------------------------------------
    def load(
        self,
        source: str,
        base_config=None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        role: str = "fine-tune",
    ) -> nn.Module:
        """The full model at ``source`` (hub id, directory, ``.safetensors`` file). ``role``: ``base`` or
        ``fine-tune`` (a kind may accept different classes for each)."""
        raise NotImplementedError

    def split(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """(backbone to merge, head shell or None). Destructive: the model's backbone is replaced by a stub."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """A loaded model made ready to be called as the kind calls it (identity; seq2seq LMs: first output token)."""
        return model

    def backbone_of(self, model: nn.Module) -> nn.Module:
        """The backbone inside a full model, without modifying it."""
        raise NotImplementedError

    def lora_prefix(self, model: nn.Module) -> str:
        """Attribute path of the backbone inside the full model as PEFT names it ('' when the model is merged whole)."""
        return ""

    def lora_head(
        self, base_model: nn.Module, head_tensors: Mapping[str, Tensor], task: str, source: str, dtype: torch.dtype
    ) -> nn.Module | None:
        """A head shell for a LoRA adapter from the head tensors it saves (None when the kind has no per-task heads)."""
        return None

    def build_heads(
        self,
        base_model: nn.Module,
        base_source: str,
        tasks: list[str],
        options: Mapping[str, Any] | None,
        dtype: torch.dtype,
    ) -> dict[str, nn.Module] | None:
        """Heads built from the base for every task (CLIP zero-shot heads); None: each fine-tune brings its own."""
        if options:
            raise MergeInputError(
                f"heads: task_type {self.name!r} takes each task's head from its fine-tune; "
                f"'heads' options apply to task_type clip"
            )
        return None

    def keeps_pooler(self, options: Mapping[str, Any] | None) -> bool:
        """Whether ``options`` (the ``heads`` argument) give each task its fine-tune's own pooler (headed kinds)."""
        return False

    def preprocessor(self, source: str, trust_remote_code: bool = False):
        """The tokenizer (text) or image processor (image) saved with ``source``."""
        from transformers import AutoImageProcessor, AutoTokenizer

        cls = AutoTokenizer if self.modality == "text" else AutoImageProcessor
        return cls.from_pretrained(source, trust_remote_code=trust_remote_code)

    # -- running ------------------------------------------------------------------------------------------------------
    def head_logits(self, head: nn.Module | None, features, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits of ``head`` on backbone ``features`` of ``inputs``."""
        return apply_head(head, features, inputs)

    def token_mask(self, inputs: Mapping[str, Tensor]) -> Tensor | None:
        """``[n, L]``: the positions of token-level logits (``[n, L, V]``) that count — the inputs' non-pad tokens;
        None: every position (row-level logits ignore it)."""
        return inputs.get("attention_mask")

    def feature_field(self, output) -> str:
        """The name of the backbone output field the heads read (see ``feature_fields``)."""
        for f in self.feature_fields:
            if getattr(output, f, None) is not None:
                return f
        raise MergeInputError(f"task_type {self.name!r}: backbone output has none of {self.feature_fields}")

    def feature_dim(self, backbone: nn.Module) -> int:
        """Width of the feature the heads read (Surgery's adapters)."""
        return backbone.config.hidden_size

    def check_features(self) -> None:
        """Refuse feature-based objectives where the kind has no backbone features."""

    # -- export / reading back -----------------------------------------------------------------------------------------
    def head_info(self, head: nn.Module) -> dict[str, Any]:
        """What the manifest records of a head (enough for :meth:`head_from_tensors`)."""
        return {
            "num_labels": head.config.num_labels,
            "id2label": head.config.id2label,
            "architecture": type(head).__name__,
        }

    def head_from_tensors(
        self, root, info: Mapping[str, Any], tensors: Mapping[str, Tensor], dtype: torch.dtype
    ) -> nn.Module:
        """A head shell rebuilt from an export (``root``: the export directory, ``tensors``: the head's tensors)."""
        raise NotImplementedError

    def load_backbone(self, root, dtype: torch.dtype) -> nn.Module:
        """The exported root model (the merged backbone) with stock ``transformers``."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(root), dtype=dtype)

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        """The model card's "Use" paragraph and snippet (markdown)."""
        return f'```python\nfrom transformers import AutoModel\nbackbone = AutoModel.from_pretrained("{repo}")\n```\n'

    def task_model_files(self, head: nn.Module, root_config) -> tuple[Any, str] | None:
        """``(config, backbone prefix)`` of a complete per-task checkpoint (``tasks/<task>/``), None when the kind
        has no stock per-task class."""
        return None

    def task_model(
        self,
        root,
        task: str,
        info: Mapping[str, Any],
        backbone_state: Mapping[str, Tensor],
        head_tensors: Mapping[str, Tensor],
        dtype: torch.dtype,
    ) -> nn.Module:
        """A stock per-task model for ``task`` from an export's root weights and the task's head tensors."""
        raise MergeInputError(
            f"{root}: task_type {self.name!r} has no stock per-task model class; use "
            "adamerge.load_merged(path).predict(task, ...)"
        )


def num_labels_of(head_tensors: Mapping[str, Tensor], prefix: str, hidden_size: int | None, source: str) -> int:
    """Guess ``num_labels`` of a bare checkpoint from its head's output tensor (a 2-D tensor outside the backbone
    whose first dimension is not the hidden size)."""
    outs = {
        t.shape[0]
        for k, t in head_tensors.items()
        if not k.startswith(prefix + ".") and t.ndim == 2 and t.shape[0] != hidden_size
    }
    if len(outs) != 1:
        raise MergeInputError(f"cannot infer num_labels of {source}: put a config.json next to the file")
    return outs.pop()


def refuse_fresh(source: str, info: dict, allowed: list[str], cls_name: str) -> None:
    """Refuse a checkpoint that transformers completed with random tensors (``info``: ``output_loading_info``), naming
    them, except the ``allowed`` ones (a base's own classifier, which no merge reads)."""
    fresh = sorted(set(info.get("missing_keys") or ()) - set(allowed))
    if fresh:
        raise MergeInputError(
            f"{source}: loading it as {cls_name} would initialise {fresh[:5]}{'…' if len(fresh) > 5 else ''} at "
            f"random (they are not in the checkpoint); save the model with its head ({cls_name}.save_pretrained), "
            "not a bare backbone"
        )
