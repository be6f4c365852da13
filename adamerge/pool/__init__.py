"""Load a base model and its fine-tunes, check they are compatible, and stack their task vectors.

A *pool* holds one frozen copy of the base backbone, each fine-tune's frozen head, and the task vectors
``τ_t = θ_t − θ0`` stacked per tensor. No full copy of any fine-tuned model is kept.

What is merged and what stays per task depends on the model kind (``task_type``: ``seq_cls``, ``causal_lm``,
``image_cls``, ``clip``; see :mod:`adamerge.kinds`).

Sources may be Hugging Face hub ids, local directories, single ``.safetensors`` files (which reuse the base config,
or a ``config.json`` next to the file), or **PEFT LoRA adapter directories** (``adapter_config.json``). LoRA task
vectors stay low-rank: ``ΔW_t = s_t B_t A_t`` is stored as stacked factors ``B [T, out, r]`` (scale folded in) and
``A [T, r, in]``; a tensor only some adapters target gets zero factors for the others. When full fine-tunes and
adapters are mixed, or an adapter also saves a backbone tensor in full, that tensor is stored dense.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.io.sources import _naming, check_source, is_lora_adapter, state_hash
from adamerge.kinds import get_kind
from adamerge.pool.lora import _stack_low_rank, read_lora

log = logging.getLogger(__name__)


def load_model(
    source: str,
    task_type: str = "seq_cls",
    base_config=None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """Load a full model of ``task_type`` from a hub id, directory or ``.safetensors`` file."""
    return get_kind(task_type).load(source, base_config, trust_remote_code, dtype)


@dataclass
class TaskVectorPool:
    """Frozen base backbone, per-task head shells and stacked task vectors (dense and low-rank)."""

    backbone: nn.Module
    heads: dict[str, nn.Module]
    task_names: list[str]
    task_vectors: dict[str, Tensor]
    config: object
    base_source: str
    sources: dict[str, str]
    hashes: dict[str, str] = field(default_factory=dict)
    low_rank: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (B [T,out,r], A [T,r,in])
    task_type: str = "seq_cls"
    tokenizer: object = None  # the union tokenizer when fine-tunes added tokens (see adamerge.pool.vocab)
    expert_buffers: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # task -> its own float buffers

    @property
    def param_names(self) -> list[str]:
        return [*self.task_vectors, *self.low_rank]

    def base_params(self) -> dict[str, Tensor]:
        params = dict(self.backbone.named_parameters())
        return {n: params[n] for n in self.param_names}


def _check_finite(state: dict[str, Tensor], label: str) -> None:
    """``label`` names the model in the error, e.g. ``'spam' (path/to/model)``."""
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MergeInputError(f"model {label}: tensor {k!r} contains NaN or Inf")


def _own_memory(module: nn.Module) -> nn.Module:
    """Copy ``module``'s tensors out of the checkpoint file they were memory-mapped from. A kept head that still
    points into its fine-tune's mapped safetensors file keeps the whole mapping, and every page of it that was read
    while taking the task vector stays resident: T checkpoints' worth of RSS for a few small head tensors."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.data = t.data.clone()
    return module


def load_pool(
    base: str,
    models: dict[str, str],
    tv_dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    task_type: str = "seq_cls",
    heads: dict | None = None,
    dense_lora: bool = False,
) -> TaskVectorPool:
    """Load ``base`` and each fine-tune in ``models`` (task name → source) into a :class:`TaskVectorPool`.

    Args:
        base: the pretrained model the fine-tunes started from.
        models: task name → fine-tuned model (hub id, directory, ``.safetensors`` file) or PEFT LoRA adapter dir.
        tv_dtype: storage dtype of the stacked task vectors (e.g. ``torch.bfloat16`` halves their memory);
            defaults to the model dtype. Merging always computes in the model dtype.
        trust_remote_code: passed to ``transformers``; off unless the user sets it.
        dtype: dtype the models are loaded in.
        task_type: the model kind (:mod:`adamerge.kinds`): ``seq_cls``, ``causal_lm``, ``seq2seq_lm``, ``image_cls``,
            ``clip``.
        heads: per-task head options of kinds that build heads from the base (``clip``: class names, templates).
        dense_lora: store LoRA adapters' task vectors as dense products ``B A`` instead of their factors (what
            TIES, TSV-M, Iso-C, DARE and WEMoE work on; PEFT adapters cannot then be exported).
    """
    if not models:
        raise MergeInputError("models: at least one fine-tuned model is required")
    kind = get_kind(task_type)
    check_source(base, "base")
    for task, source in models.items():
        check_source(source, f"fine-tune {task!r}")
    builder = _PoolBuilder(kind, base, models, tv_dtype, trust_remote_code, dtype, heads)
    builder.dense_lora = dense_lora
    for i, (task, source) in enumerate(models.items()):
        if is_lora_adapter(source):
            builder.add_adapter(i, task, source)
        else:
            builder.add_fine_tune(i, task, source)
    return builder.finish(task_type)


class _PoolBuilder:
    """The steps of :func:`load_pool`: the base (with the union vocabulary when fine-tunes added tokens), then each
    fine-tune's or adapter's task vector written into preallocated ``[T, ...]`` stacks, then the heads and stacks."""

    def __init__(
        self, kind, base: str, models: dict[str, str], tv_dtype, trust_remote_code: bool, dtype, heads: dict | None
    ) -> None:
        self.kind, self.base, self.models, self.dtype = kind, base, models, dtype
        self.trust_remote_code = trust_remote_code
        with _naming("base"):
            base_model = kind.load(base, trust_remote_code=trust_remote_code, dtype=dtype, role="base")
        self.hashes = {"base": state_hash(base_model.state_dict())}
        self.plan = _vocab_plan(base, base_model, models, trust_remote_code) if kind.modality == "text" else None
        self.vocab_names: set[str] = set()
        if self.plan is not None:  # fine-tunes added tokens: the base gets the union's rows (see adamerge.pool.vocab)
            from adamerge.pool.vocab import resize_base, vocab_param_names

            resize_base(base_model, self.plan)
            self.vocab_names = set(vocab_param_names(base_model, kind.backbone_of(base_model)))
            log.info(
                "union vocabulary: %d rows, %d added tokens %s",
                self.plan.size,
                len(self.plan.added),
                self.plan.added[:5],
            )
        self.added_rows: dict[str, dict[int, list[Tensor]]] = {n: {} for n in self.vocab_names}
        self.head_proto = base_model  # architecture reference for LoRA heads
        with _naming("base"):
            self.built_heads = kind.build_heads(base_model, base, list(models), heads, dtype)
        self.prefix = kind.lora_prefix(base_model)
        self.backbone, _ = kind.split(base_model)
        self.config = self.backbone.config
        self.backbone.requires_grad_(False).eval()
        self.base_params = dict(self.backbone.named_parameters())
        self.base_buffers = dict(self.backbone.named_buffers())
        self.expert_buffers: dict[str, dict[str, Tensor]] = {}
        self.base_state = {n: p.detach() for n, p in self.base_params.items()}
        _check_finite(self.base_state, f"base ({base})")
        self.tv_dtype = tv_dtype or dtype
        self.dense: dict[str, Tensor] = {}  # written straight into [T, ...] stacks: no per-task copies to stack
        self.factors: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
        self.dense_lora = False  # LoRA factors stored as dense products (load_pool's dense_lora)
        self.task_heads: dict[str, nn.Module] = dict(self.built_heads or {})
        self.keep_pooler = kind.keeps_pooler(heads)
        self.poolers: dict[str, dict[str, Tensor]] = {}  # heads: {pooler: true}: each fine-tune's pooler, exactly

    def dense_slot(self, n: str) -> Tensor:
        if n not in self.dense:
            self.dense[n] = torch.zeros((len(self.models), *self.base_state[n].shape), dtype=self.tv_dtype)
        return self.dense[n]

    def add_adapter(self, i: int, task: str, source: str) -> None:
        """A PEFT LoRA adapter: its factors kept low-rank (convolutions' made dense), saved tensors dense."""
        base_state = self.base_state
        delta = read_lora(source, self.prefix, set(self.base_params))
        self.hashes[task] = state_hash(delta.state)
        _check_finite(delta.state, f"{task!r} ({source})")
        for n, (B, A) in delta.factors.items():
            if A.dim() > 2:  # a convolution's LoRA (peft: A a conv with the layer's kernel, B a 1×1 conv)
                shape = (B.shape[0], *A.shape[1:])
                if shape != tuple(base_state[n].shape):
                    grouped = shape[0] == base_state[n].shape[0] and shape[2:] == tuple(base_state[n].shape[2:])
                    raise MergeInputError(
                        f"adapter {task!r} ({source}): LoRA factors of {n!r} give shape {shape}, base has "
                        f"{tuple(base_state[n].shape)}"
                        + (" (a grouped convolution: peft cannot merge LoRA on it either)" if grouped else "")
                    )
                # ΔW[o, i, k…] = Σ_r B[o, r] A[r, i, k…], as peft's merge: a dense task vector here
                self.dense_slot(n)[i] = (B.flatten(1).float() @ A.flatten(1).float()).view(shape)
                continue
            if (B.shape[0], A.shape[1]) != tuple(base_state[n].shape):
                raise MergeInputError(
                    f"adapter {task!r} ({source}): LoRA factors of {n!r} give shape "
                    f"{(B.shape[0], A.shape[1])}, base has {tuple(base_state[n].shape)}"
                )
            self.factors.setdefault(n, {})[i] = (B.to(self.tv_dtype), A.to(self.tv_dtype))
        for n, t in delta.dense.items():
            self.dense_slot(n)[i] = t.to(base_state[n].dtype) - base_state[n]
        if self.kind.per_task_heads and self.built_heads is None:
            self.task_heads[task] = self.kind.lora_head(self.head_proto, delta.head, task, source, self.dtype)
        if self.keep_pooler:  # the adapter's pooler: saved whole, LoRA on it (B A), or the base's
            self.poolers[task] = _pooler_of(
                {
                    n: delta.dense[n]
                    if n in delta.dense
                    else base_state[n]
                    + (delta.factors[n][0].float() @ delta.factors[n][1].float()).to(base_state[n].dtype)
                    if n in delta.factors
                    else base_state[n]
                    for n in base_state
                    if n.startswith("pooler.")
                }
            )

    def add_fine_tune(self, i: int, task: str, source: str) -> None:
        """A full fine-tune: its backbone checked against the base, its task vector, head and own buffers."""
        with _naming(f"fine-tune {task!r}"):
            ft = self.kind.load(
                source, base_config=self.config, trust_remote_code=self.trust_remote_code, dtype=self.dtype
            )
        self.hashes[task] = state_hash(ft.state_dict())
        ft_backbone, head = self.kind.split(ft)
        if type(ft_backbone) is not type(self.backbone):
            raise MergeInputError(
                f"model {task!r} ({source}) is a {type(ft).__name__}, base is a "
                f"{type(self.head_proto).__name__}: architectures differ"
            )
        ft_state = {n: p.detach() for n, p in ft_backbone.named_parameters()}
        missing = sorted(set(self.base_params) - set(ft_state))
        extra = sorted(set(ft_state) - set(self.base_params))
        if missing or extra:
            raise MergeInputError(
                f"model {task!r} ({source}): backbone keys differ from the base: "
                f"missing {missing[:5]}, extra {extra[:5]}"
            )
        _check_finite(ft_state, f"{task!r} ({source})")
        if self.keep_pooler:
            self.poolers[task] = _pooler_of(ft_state)
        if self._write_task_vector(i, task, source, ft, ft_state):
            log.warning("model %r (%s) is identical to the base: its task vector is zero", task, source)
        if head is not None and self.built_heads is None:
            self.task_heads[task] = _own_memory(head.requires_grad_(False).eval())
        own = {
            n: b.detach().clone()
            for n, b in ft_backbone.named_buffers()
            if n in self.base_buffers and b.is_floating_point() and not torch.equal(b, self.base_buffers[n])
        }
        if own:  # e.g. BatchNorm running statistics: the expert (the fine-tune itself) runs with its own
            self.expert_buffers[task] = own

    def _write_task_vector(self, i: int, task: str, source: str, ft: nn.Module, ft_state: dict[str, Tensor]) -> bool:
        """Write ``θ_t − θ0`` of every tensor into slot ``i`` (vocabulary rows remapped to the union); True when it is
        zero everywhere."""
        base_state, zero = self.base_state, True
        for n, p in ft_state.items():
            if n in self.vocab_names and p.shape[1:] == base_state[n].shape[1:]:
                tv, rows = self.plan.remap(task, p, base_state[n])
                for u, row in rows.items():
                    self.added_rows[n].setdefault(u, []).append(row.clone())
                slot = self.dense_slot(n)
                slot[i].copy_(tv)
                zero = zero and not bool(slot[i].any())
                continue
            if p.shape != base_state[n].shape:
                hint = ""
                if getattr(ft.config, "vocab_size", None) != getattr(self.config, "vocab_size", None):
                    hint = (
                        f" (vocab size {ft.config.vocab_size} vs base {self.config.vocab_size}; a fine-tune that "
                        "added tokens merges into the union vocabulary when it and the base have their "
                        "tokenizers saved with them)"
                    )
                raise MergeInputError(
                    f"model {task!r} ({source}): tensor {n!r} has shape {tuple(p.shape)}, "
                    f"base has {tuple(base_state[n].shape)}{hint}"
                )
            slot = self.dense_slot(n)
            slot[i].copy_(p - base_state[n])
            zero = zero and not bool(slot[i].any())
        return zero

    def finish(self, task_type: str) -> TaskVectorPool:
        """The heads (with their poolers), the added tokens' rows, and the stacks, as a pool."""
        for task, values in self.poolers.items():
            self.task_heads[task] = self.kind.with_pooler(self.task_heads[task], self.backbone, values)
        with torch.no_grad():
            for n, rows in self.added_rows.items():  # an added token's row: the mean of the fine-tunes that have it
                for u, rs in rows.items():
                    self.base_state[n][u] = torch.stack(rs).to(self.base_state[n].dtype).mean(0)
        T, dense, low_rank = len(self.models), self.dense, {}
        if self.dense_lora and self.factors:
            log.info("LoRA adapters: task vectors stored as dense products B A (the method works on dense ones)")
        for n, per_task in self.factors.items():
            if self.dense_lora and n not in dense:
                dense[n] = torch.zeros(T, *self.base_state[n].shape, dtype=self.tv_dtype)
            if n in dense:  # full fine-tunes (or saved modules) touch it too: store dense
                for t, (B, A) in per_task.items():
                    dense[n][t] += (B.float() @ A.float()).to(self.tv_dtype)
            else:
                low_rank[n] = _stack_low_rank([per_task.get(t) for t in range(T)], self.tv_dtype)
        task_vectors = {n: dense[n] for n in self.base_params if n in dense}  # the model's tensor order
        n_el = sum(t.numel() for t in task_vectors.values()) + sum(b.numel() + a.numel() for b, a in low_rank.values())
        log.info(
            "pool: %d tasks, %d dense + %d low-rank tensors, %.1fM task-vector elements",
            T,
            len(task_vectors),
            len(low_rank),
            n_el / 1e6,
        )
        return TaskVectorPool(
            backbone=self.backbone,
            heads=self.task_heads,
            task_names=list(self.models),
            task_vectors=task_vectors,
            config=self.config,
            base_source=self.base,
            sources=dict(self.models),
            hashes=self.hashes,
            low_rank=low_rank,
            task_type=task_type,
            tokenizer=self.plan.tokenizer if self.plan is not None else None,
            expert_buffers=self.expert_buffers,
        )


def _pooler_of(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n[len("pooler.") :]: v.detach().clone() for n, v in values.items() if n.startswith("pooler.")}


def _vocab_plan(base: str, base_model: nn.Module, models: dict[str, str], trust_remote_code: bool):
    """The union-vocabulary plan (:func:`adamerge.pool.vocab.plan_vocab`), None when no fine-tune's vocabulary
    differs."""
    from adamerge.pool.vocab import load_tokenizer, model_rows, plan_vocab

    rows = base_model.get_input_embeddings().weight.shape[0]
    return plan_vocab(
        (base, load_tokenizer(base, trust_remote_code), rows),
        {t: (s, load_tokenizer(s, trust_remote_code), model_rows(s, trust_remote_code)) for t, s in models.items()},
    )
