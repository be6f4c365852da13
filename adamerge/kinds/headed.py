"""Shared by the kinds whose models are ``AutoModelFor<Task>`` classes with a backbone at ``base_model_prefix`` and a
task head around it (sequence and image classification): the backbone is merged, each task keeps its own head."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.io.sources import is_safetensors_file, read_state_dict
from adamerge.kinds.base import FeatureStub, ModelKind, default_decoder_inputs, num_labels_of, refuse_fresh


def is_nonpersistent(key: str) -> bool:
    return key.endswith(("position_ids", "token_type_ids", "num_batches_tracked"))


class PoolerStub(FeatureStub):
    """A head's own copy of the backbone's pooler (``heads: {pooler: true}``): the head reads ``pooler`` applied to
    the merged backbone's ``last_hidden_state`` instead of the merged pooler's output. Inside the head shell it sits
    where the backbone was, so the shell's keys are the full model's (``bert.pooler.dense.weight``, ...) and a
    per-task export is a stock checkpoint with the task's own pooler."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, *args, **kwargs):  # noqa: D102
        f = self.features
        return type(f)(**{**f, "pooler_output": self.pooler(f.last_hidden_state)})


def owns_pooler(head: nn.Module | None) -> bool:
    """Whether ``head`` carries its own pooler (see :class:`PoolerStub`)."""
    return head is not None and isinstance(getattr(head, getattr(head, "base_model_prefix", ""), None), PoolerStub)


HEAD_OPTIONS = ("pooler",)


def _shifted_input_ids(backbone: nn.Module, kwargs):
    ids = kwargs.get("input_ids")
    return None if ids is None else backbone._shift_right(ids)


def decoder_inputs_from_input_ids(backbone: nn.Module) -> nn.Module:
    """``backbone`` (in place), run without ``decoder_input_ids``, derives them from ``input_ids`` as its
    ``*ForSequenceClassification`` model does before calling it. ``T5Model`` (T5, mT5, UMT5) requires them, while
    ``T5ForSequenceClassification`` passes ``_shift_right(input_ids)``; BART's backbone shifts by itself."""
    if getattr(backbone.config, "is_encoder_decoder", False) and hasattr(backbone, "_shift_right"):
        default_decoder_inputs(backbone, _shifted_input_ids)
    return backbone


def head_config(root, info: Mapping[str, Any]):
    """The export's root config with a head's labels (:meth:`HeadedKind.head_info`): its ``id2label``, the inverse
    ``label2id`` and the ``num_labels`` that follows (a mismatch with the recorded ``num_labels`` is refused)."""
    from transformers import AutoConfig

    id2label = {int(k): v for k, v in info["id2label"].items()}
    config = AutoConfig.from_pretrained(str(root), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if config.num_labels != info["num_labels"]:
        raise MergeInputError(
            f"{root}: a head's id2label has {config.num_labels} labels, its num_labels is {info['num_labels']}"
        )
    return config


class HeadedKind(ModelKind):
    """A kind whose full model is ``auto_class_name`` (``AutoModelForSequenceClassification``, ...).

    Head option ``pooler`` (``heads: {pooler: true}``): each task keeps its fine-tune's pooler (BERT's
    ``pooler.dense``, which only the classification head reads) as part of its head instead of reading the merged
    one, as RoBERTa, ELECTRA and DeBERTa classifiers keep their dense pooling layer in the head already. The merged
    backbone (the export's root) still holds the merged pooler."""

    def build_heads(
        self,
        base_model: nn.Module,
        base_source: str,
        tasks: list[str],
        options: Mapping[str, Any] | None,
        dtype: torch.dtype,
    ) -> dict[str, nn.Module] | None:
        unknown = sorted(set(options or {}) - set(HEAD_OPTIONS))
        if unknown:
            raise MergeInputError(
                f"heads: unknown option(s) {unknown}: task_type {self.name!r} takes each task's "
                f"head from its fine-tune (class names and templates apply to task_type clip); "
                f"allowed here: {list(HEAD_OPTIONS)}"
            )
        if (options or {}).get("pooler"):
            pooler = getattr(self.backbone_of(base_model), "pooler", None)
            if pooler is None or not any(True for _ in pooler.parameters()):
                raise MergeInputError(
                    f"heads: pooler: {base_source} ({type(base_model).__name__}) has no pooler with "
                    "weights in its backbone; its classifier reads the backbone output directly "
                    "(or holds its pooling layer already): drop heads.pooler"
                )
        return None

    def keeps_pooler(self, options: Mapping[str, Any] | None) -> bool:
        return bool((options or {}).get("pooler"))

    def with_pooler(self, head: nn.Module, backbone: nn.Module, values: Mapping[str, Tensor]) -> nn.Module:
        """``head`` with its own copy of ``backbone``'s pooler, set to ``values`` (names relative to the pooler)."""
        pooler = copy.deepcopy(backbone.pooler)
        with torch.no_grad():
            for n, p in pooler.named_parameters():
                p.copy_(values[n])
        setattr(head, head.base_model_prefix, PoolerStub(pooler.requires_grad_(False).eval()))
        return head

    def load(
        self,
        source: str,
        base_config=None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        role: str = "fine-tune",
    ) -> nn.Module:
        from transformers import AutoConfig

        cls = self.auto_class()
        if is_safetensors_file(source):
            cfg_path = Path(source).with_name("config.json")
            config = AutoConfig.from_pretrained(str(cfg_path.parent)) if cfg_path.is_file() else None
            if config is None:
                if base_config is None:
                    raise MergeInputError(f"{source}: a bare safetensors file needs the base model's config")
                config = base_config.__class__.from_dict(base_config.to_dict())
            state = read_state_dict(source)
            probe = cls.from_config(config)
            if not cfg_path.is_file():
                config.num_labels = num_labels_of(
                    state, probe.base_model_prefix, getattr(config, "hidden_size", None), source
                )
                probe = cls.from_config(config)
            prefix = probe.base_model_prefix
            # accept backbone-only key names (as a bare AutoModel saves them)
            expected = set(probe.state_dict())
            state = {
                (k if k in expected or (prefix + "." + k) not in expected else prefix + "." + k): v
                for k, v in state.items()
            }
            missing = sorted(k for k in expected - set(state) if not is_nonpersistent(k))
            extra = sorted(set(state) - expected)
            if missing or extra:
                raise MergeInputError(
                    f"{source}: state dict does not match {type(probe).__name__}: "
                    f"missing keys {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                    f"unexpected keys {extra[:5]}{'…' if len(extra) > 5 else ''}"
                )
            probe.load_state_dict(state, strict=False)
            return probe.to(dtype)
        try:
            model, info = cls.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        except Exception as e:  # transformers/safetensors raise many types (OSError, ValueError, SafetensorError, ...)
            raise MergeInputError(f"cannot load model {source!r}: {type(e).__name__}: {e}") from e
        model._adamerge_initialized = frozenset(info.get("missing_keys") or ())  # not in the checkpoint: fresh
        # the base's head is not merged (each fine-tune brings its own): only its backbone must be complete
        head_keys = [k for k in info.get("missing_keys") or () if not k.startswith(model.base_model_prefix + ".")]
        refuse_fresh(source, info, head_keys if role == "base" else [], type(model).__name__)
        return model

    def backbone_of(self, model: nn.Module) -> nn.Module:
        return getattr(model, model.base_model_prefix)

    def split(self, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        backbone = self.backbone_of(model)
        setattr(model, model.base_model_prefix, FeatureStub())
        return decoder_inputs_from_input_ids(backbone), model

    def load_backbone(self, root, dtype: torch.dtype) -> nn.Module:
        """The export's root with stock ``AutoModel``. Some backbones leave their pooler out by default
        (``Data2VecVisionModel(add_pooling_layer=False)``) while their classifier builds it and reads it: a root
        holding pooler weights the default class would drop is loaded with ``add_pooling_layer=True``."""
        import inspect

        from transformers import AutoModel

        model, info = AutoModel.from_pretrained(str(root), dtype=dtype, output_loading_info=True)
        if info.get("unexpected_keys") and "add_pooling_layer" in inspect.signature(type(model).__init__).parameters:
            model, info = AutoModel.from_pretrained(
                str(root), dtype=dtype, output_loading_info=True, add_pooling_layer=True
            )
        if info.get("unexpected_keys"):
            raise MergeInputError(
                f"{root}: {type(model).__name__} has no place for the export's tensors "
                f"{sorted(info['unexpected_keys'])[:5]}"
            )
        return decoder_inputs_from_input_ids(model)

    def lora_prefix(self, model: nn.Module) -> str:
        return model.base_model_prefix

    def from_config(self, config, dtype: torch.dtype, architecture: str | None = None) -> nn.Module:
        """A model of ``config`` of the class a head recorded (:meth:`head_info`'s ``architecture``) where
        ``transformers`` has it — the Auto class's default can be another one (DeiT's ``…WithTeacher`` fine-tunes
        have two heads) — else of the Auto class's."""
        import transformers

        cls = getattr(transformers, architecture, None) if architecture else None
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return self.auto_class().from_config(config, dtype=dtype)

    def shell(self, config, dtype: torch.dtype, pooler: bool = False, architecture: str | None = None) -> nn.Module:
        """An empty head shell of ``config``'s architecture (its backbone a stub; ``pooler``: one that holds its own
        pooler, :class:`PoolerStub`); ``architecture``: the class a head recorded (:meth:`from_config`)."""
        shell = self.from_config(config, dtype, architecture)
        backbone = getattr(shell, shell.base_model_prefix)
        setattr(shell, shell.base_model_prefix, PoolerStub(backbone.pooler) if pooler else FeatureStub())
        return shell

    def lora_head(
        self, base_model: nn.Module, head_tensors: Mapping[str, Tensor], task: str, source: str, dtype: torch.dtype
    ) -> nn.Module:
        if not head_tensors:
            raise MergeInputError(
                f"adapter {task!r} ({source}) saves no classifier head: train it with the task's "
                f"PEFT task_type (SEQ_CLS) or modules_to_save=['classifier']"
            )
        config = base_model.config.__class__.from_dict(base_model.config.to_dict())
        config.num_labels = num_labels_of(
            head_tensors, base_model.base_model_prefix, getattr(config, "hidden_size", None), source
        )
        shell = self.shell(config, dtype)
        # Head modules the adapter does not save (DeBERTa's pooler, ModernBERT's head: outside peft's default
        # modules_to_save) stayed the base's while it trained: they are taken from the base, as peft serves them —
        # unless the base checkpoint lacks them too (transformers initialised them at random when loading it).
        base_head = base_model.state_dict()  # the backbone is a stub here: head tensors only
        kept = [k for k in shell.state_dict() if k not in head_tensors and k in base_head]
        fresh = sorted(k for k in kept if k in getattr(base_model, "_adamerge_initialized", ()))
        if fresh:
            raise MergeInputError(
                f"adapter {task!r} ({source}) does not save the head tensors {fresh[:5]} and the "
                f"base does not hold them either (transformers initialised them at random when "
                f"loading it), so this head cannot be rebuilt: save those modules with the "
                f"adapter (peft modules_to_save)"
            )
        try:
            shell.load_state_dict({**{k: base_head[k] for k in kept}, **head_tensors}, strict=True)
        except RuntimeError as e:
            raise MergeInputError(
                f"adapter {task!r} ({source}): classifier tensors do not fit the base's head: {e}"
            ) from e
        return shell.requires_grad_(False).eval()

    def head_from_tensors(
        self, root, info: Mapping[str, Any], tensors: Mapping[str, Tensor], dtype: torch.dtype
    ) -> nn.Module:
        config = head_config(root, info)
        pooler = any(k.split(".")[1:2] == ["pooler"] for k in tensors)  # saved with heads: {pooler: true}
        shell = self.shell(config, dtype, pooler=pooler, architecture=info.get("architecture"))
        shell.load_state_dict(dict(tensors), strict=True)
        return shell

    def task_model_files(self, head: nn.Module, root_config) -> tuple[Any, str]:
        config = copy.deepcopy(head.config)
        config.architectures = [type(head).__name__]
        for key in ("vocab_size",):  # the backbone's (a union vocabulary makes it larger than the fine-tune's)
            if hasattr(root_config, key):
                setattr(config, key, getattr(root_config, key))
        return config, head.base_model_prefix

    def card_usage(self, repo: str, task: str, per_task_models: bool) -> str:
        auto = self.auto_class_name
        return (
            "The merged backbone loads with stock `transformers`; each task's classifier is a complete model "
            "under `tasks/<task>/`"
            + ("" if per_task_models else " (not written for this export: use `adamerge.load_merged`)")
            + ":\n\n"
            f"```python\nfrom transformers import AutoModel, {auto}\n"
            f'backbone = AutoModel.from_pretrained("{repo}")\n'
            f'classifier = {auto}.from_pretrained("{repo}", subfolder="tasks/{task}")\n```\n'
        )

    def task_model(
        self,
        root,
        task: str,
        info: Mapping[str, Any],
        backbone_state: Mapping[str, Tensor],
        head_tensors: Mapping[str, Tensor],
        dtype: torch.dtype,
    ) -> nn.Module:
        """A stock ``AutoModelFor<Task>`` for ``task`` from an export's root weights and the task's head tensors."""
        config = head_config(root, info)
        model = self.from_config(config, dtype, info.get("architecture"))
        prefix = model.base_model_prefix
        state = {f"{prefix}.{k}": v for k, v in backbone_state.items()}
        state.update(head_tensors)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not is_nonpersistent(k)]
        if missing or unexpected:
            raise MergeInputError(
                f"{root}: task {task!r} checkpoint keys do not match: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return model.eval()
