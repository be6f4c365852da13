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

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.kinds import get_kind
from adamerge.kinds.headed import read_state_dict

log = logging.getLogger(__name__)


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
    return (Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1
            or "\\" in text or text.endswith((".safetensors", ".bin", ".json")))


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


def load_model(source: str, task_type: str = "seq_cls", base_config=None, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32):
    """Load a full model of ``task_type`` from a hub id, directory or ``.safetensors`` file."""
    return get_kind(task_type).load(source, base_config, trust_remote_code, dtype)


def is_lora_adapter(source: str) -> bool:
    return Path(source).is_dir() and (Path(source) / "adapter_config.json").is_file()


@dataclass
class LoraDelta:
    """One adapter read as backbone deltas: low-rank factors, dense tensors (saved modules), and head tensors."""

    factors: dict[str, tuple[Tensor, Tensor]]  # name -> (B [out, r] with the scale folded in, A [r, in])
    dense: dict[str, Tensor]  # backbone tensors the adapter saves in full (modules_to_save): the full new value
    head: dict[str, Tensor]  # head tensors (kinds with per-task heads), relative to the head shell
    state: dict[str, Tensor]  # the adapter's raw tensors (for hashing)


def _adapter_tensors(path: Path) -> dict[str, Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return read_state_dict(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise MergeInputError(f"LoRA adapter {path}: no adapter_model.safetensors or adapter_model.bin")


def read_lora(source: str, prefix: str, backbone_names: set[str]) -> LoraDelta:
    """Read a PEFT LoRA adapter into backbone deltas (``prefix``: the backbone's attribute, '' when the model is
    merged whole)."""
    path = Path(source)
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeInputError(f"adapter {source}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    if cfg.get("use_dora"):
        raise MergeInputError(f"adapter {source}: DoRA adapters are not supported (use_dora: true)")
    raw = _adapter_tensors(path)
    alpha, alpha_pattern = cfg.get("lora_alpha", 8), cfg.get("alpha_pattern") or {}
    rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))

    def rel(key: str) -> str:
        key = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else ("" if prefix else key)

    factors, dense, head = {}, {}, {}
    for key, t in raw.items():
        for a_tag, b_tag, transposed in ((".lora_A.", ".lora_B.", fan_in_fan_out),
                                         (".lora_embedding_A", ".lora_embedding_B", True)):
            if a_tag in key:
                module = key.split(a_tag)[0]
                b_key = key.replace(a_tag, b_tag)
                if b_key not in raw:
                    raise MergeInputError(f"adapter {source}: {key!r} has no matching {b_key!r}")
                name = rel(module + ".weight")
                if name not in backbone_names:
                    raise MergeInputError(f"adapter {source}: targets {module!r}, which is not a backbone weight")
                A, B = t.float(), raw[b_key].float()
                r = A.shape[0]
                a = next((v for k, v in alpha_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), alpha)
                scale = a / math.sqrt(r) if rslora else a / r
                factors[name] = (A.T * scale, B.T) if transposed else (B * scale, A)
        if "lora_" in key:
            continue
        name = rel(key)
        if name and name in backbone_names:
            dense[name] = t
        else:
            head[key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")] = t
    if not factors and not dense:
        raise MergeInputError(f"adapter {source}: no LoRA tensors found")
    return LoraDelta(factors, dense, head, raw)


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
    tokenizer: object = None  # the union tokenizer when fine-tunes added tokens (see adamerge.vocab)
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


def _stack_low_rank(per_task: list[tuple[Tensor, Tensor] | None], dtype) -> tuple[Tensor, Tensor]:
    """Stack (B, A) factors of T tasks, zero-padding ranks (and tasks without this tensor) to the largest rank."""
    ref = next(f for f in per_task if f is not None)
    out_dim, in_dim = ref[0].shape[0], ref[1].shape[1]
    r = max(f[0].shape[1] for f in per_task if f is not None)
    B = torch.zeros(len(per_task), out_dim, r, dtype=dtype)
    A = torch.zeros(len(per_task), r, in_dim, dtype=dtype)
    for t, f in enumerate(per_task):
        if f is not None:
            B[t, :, :f[0].shape[1]] = f[0]
            A[t, :f[1].shape[0]] = f[1]
    return B, A


def _own_memory(module: nn.Module) -> nn.Module:
    """Copy ``module``'s tensors out of the checkpoint file they were memory-mapped from. A kept head that still
    points into its fine-tune's mapped safetensors file keeps the whole mapping, and every page of it that was read
    while taking the task vector stays resident: T checkpoints' worth of RSS for a few small head tensors."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.data = t.data.clone()
    return module


def load_pool(base: str, models: dict[str, str], tv_dtype: torch.dtype | None = None,
              trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
              task_type: str = "seq_cls", heads: dict | None = None) -> TaskVectorPool:
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
    """
    if not models:
        raise MergeInputError("models: at least one fine-tuned model is required")
    kind = get_kind(task_type)
    check_source(base, "base")
    for task, source in models.items():
        check_source(source, f"fine-tune {task!r}")
    with _naming("base"):
        base_model = kind.load(base, trust_remote_code=trust_remote_code, dtype=dtype, role="base")
    hashes = {"base": state_hash(base_model.state_dict())}
    plan = _vocab_plan(base, base_model, models, trust_remote_code) if kind.modality == "text" else None
    vocab_names: set[str] = set()
    if plan is not None:  # fine-tunes added tokens: the base gets the union's rows (see adamerge.vocab)
        from adamerge.vocab import resize_base, vocab_param_names

        resize_base(base_model, plan)
        vocab_names = set(vocab_param_names(base_model, kind.backbone_of(base_model)))
        log.info("union vocabulary: %d rows, %d added tokens %s", plan.size, len(plan.added), plan.added[:5])
    added_rows: dict[str, dict[int, list[Tensor]]] = {n: {} for n in vocab_names}
    head_proto = base_model  # architecture reference for LoRA heads
    with _naming("base"):
        built_heads = kind.build_heads(base_model, base, list(models), heads, dtype)
    prefix = kind.lora_prefix(base_model)
    backbone, _ = kind.split(base_model)
    config = backbone.config
    backbone.requires_grad_(False).eval()
    base_params = dict(backbone.named_parameters())
    base_buffers = dict(backbone.named_buffers())
    expert_buffers: dict[str, dict[str, Tensor]] = {}
    base_state = {n: p.detach() for n, p in base_params.items()}
    _check_finite(base_state, f"base ({base})")
    tv_dtype = tv_dtype or dtype
    T = len(models)
    # dense task vectors are written straight into preallocated [T, ...] stacks: no per-task copies to stack later
    dense: dict[str, Tensor] = {}

    def dense_slot(n: str) -> Tensor:
        if n not in dense:
            dense[n] = torch.zeros((T, *base_state[n].shape), dtype=tv_dtype)
        return dense[n]

    factors: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    task_heads: dict[str, nn.Module] = dict(built_heads or {})
    keep_pooler = kind.keeps_pooler(heads)
    poolers: dict[str, dict[str, Tensor]] = {}  # heads: {pooler: true}: each fine-tune's pooler, exactly

    def pooler_of(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n[len("pooler."):]: v.detach().clone() for n, v in values.items() if n.startswith("pooler.")}
    for i, (task, source) in enumerate(models.items()):
        if is_lora_adapter(source):
            delta = read_lora(source, prefix, set(base_params))
            hashes[task] = state_hash(delta.state)
            _check_finite(delta.state, f"{task!r} ({source})")
            for n, (B, A) in delta.factors.items():
                if A.dim() > 2:  # a convolution's LoRA (peft: A a conv with the layer's kernel, B a 1×1 conv)
                    shape = (B.shape[0], *A.shape[1:])
                    if shape != tuple(base_state[n].shape):
                        grouped = shape[0] == base_state[n].shape[0] and shape[2:] == tuple(base_state[n].shape[2:])
                        raise MergeInputError(
                            f"adapter {task!r} ({source}): LoRA factors of {n!r} give shape {shape}, base has "
                            f"{tuple(base_state[n].shape)}" + (" (a grouped convolution: peft cannot merge LoRA on "
                                                               "it either)" if grouped else ""))
                    # ΔW[o, i, k…] = Σ_r B[o, r] A[r, i, k…], as peft's merge: a dense task vector here
                    dense_slot(n)[i] = (B.flatten(1).float() @ A.flatten(1).float()).view(shape)
                    continue
                if (B.shape[0], A.shape[1]) != tuple(base_state[n].shape):
                    raise MergeInputError(f"adapter {task!r} ({source}): LoRA factors of {n!r} give shape "
                                          f"{(B.shape[0], A.shape[1])}, base has {tuple(base_state[n].shape)}")
                factors.setdefault(n, {})[i] = (B.to(tv_dtype), A.to(tv_dtype))
            for n, t in delta.dense.items():
                dense_slot(n)[i] = t.to(base_state[n].dtype) - base_state[n]
            if kind.per_task_heads and built_heads is None:
                task_heads[task] = kind.lora_head(head_proto, delta.head, task, source, dtype)
            if keep_pooler:  # the adapter's pooler: saved whole, LoRA on it (B A), or the base's
                poolers[task] = pooler_of({n: delta.dense[n] if n in delta.dense else
                                           base_state[n] + (delta.factors[n][0].float() @ delta.factors[n][1].float()
                                                            ).to(base_state[n].dtype) if n in delta.factors else
                                           base_state[n] for n in base_state if n.startswith("pooler.")})
            continue
        with _naming(f"fine-tune {task!r}"):
            ft = kind.load(source, base_config=config, trust_remote_code=trust_remote_code, dtype=dtype)
        hashes[task] = state_hash(ft.state_dict())
        ft_class = type(ft).__name__
        ft_backbone, head = kind.split(ft)
        if type(ft_backbone) is not type(backbone):
            raise MergeInputError(f"model {task!r} ({source}) is a {ft_class}, base is a "
                                  f"{type(head_proto).__name__}: architectures differ")
        ft_state = {n: p.detach() for n, p in ft_backbone.named_parameters()}
        missing, extra = sorted(set(base_params) - set(ft_state)), sorted(set(ft_state) - set(base_params))
        if missing or extra:
            raise MergeInputError(f"model {task!r} ({source}): backbone keys differ from the base: "
                                  f"missing {missing[:5]}, extra {extra[:5]}")
        _check_finite(ft_state, f"{task!r} ({source})")
        if keep_pooler:
            poolers[task] = pooler_of(ft_state)
        zero = True
        for n, p in ft_state.items():
            if n in vocab_names and p.shape[1:] == base_state[n].shape[1:]:
                tv, rows = plan.remap(task, p, base_state[n])
                for u, row in rows.items():
                    added_rows[n].setdefault(u, []).append(row.clone())
                slot = dense_slot(n)
                slot[i].copy_(tv)
                zero = zero and not bool(slot[i].any())
                continue
            if p.shape != base_state[n].shape:
                hint = ""
                if getattr(ft.config, "vocab_size", None) != getattr(config, "vocab_size", None):
                    hint = (f" (vocab size {ft.config.vocab_size} vs base {config.vocab_size}; a fine-tune that added "
                            "tokens merges into the union vocabulary when it and the base have their tokenizers "
                            "saved with them)")
                raise MergeInputError(f"model {task!r} ({source}): tensor {n!r} has shape {tuple(p.shape)}, "
                                      f"base has {tuple(base_state[n].shape)}{hint}")
            slot = dense_slot(n)
            slot[i].copy_(p - base_state[n])
            zero = zero and not bool(slot[i].any())
        if zero:
            log.warning("model %r (%s) is identical to the base: its task vector is zero", task, source)
        if head is not None and built_heads is None:
            task_heads[task] = _own_memory(head.requires_grad_(False).eval())
        own = {n: b.detach().clone() for n, b in ft_backbone.named_buffers()
               if n in base_buffers and b.is_floating_point() and not torch.equal(b, base_buffers[n])}
        if own:  # e.g. BatchNorm running statistics: the expert (the fine-tune itself) runs with its own
            expert_buffers[task] = own
        del ft, ft_backbone, ft_state
    for task, values in poolers.items():
        task_heads[task] = kind.with_pooler(task_heads[task], backbone, values)
    with torch.no_grad():
        for n, rows in added_rows.items():  # an added token's row: the mean of the fine-tunes that have it
            for u, rs in rows.items():
                base_state[n][u] = torch.stack(rs).to(base_state[n].dtype).mean(0)
    low_rank = {}
    for n, per_task in factors.items():
        if n in dense:  # full fine-tunes (or saved modules) touch it too: store dense
            for t, (B, A) in per_task.items():
                dense[n][t] += (B.float() @ A.float()).to(tv_dtype)
        else:
            low_rank[n] = _stack_low_rank([per_task.get(t) for t in range(T)], tv_dtype)
    task_vectors = {n: dense[n] for n in base_params if n in dense}  # the model's tensor order
    n_el = sum(t.numel() for t in task_vectors.values()) + sum(b.numel() + a.numel() for b, a in low_rank.values())
    log.info("pool: %d tasks, %d dense + %d low-rank tensors, %.1fM task-vector elements", T, len(task_vectors),
             len(low_rank), n_el / 1e6)
    return TaskVectorPool(backbone=backbone, heads=task_heads, task_names=list(models), task_vectors=task_vectors,
                          config=config, base_source=base, sources=dict(models), hashes=hashes, low_rank=low_rank,
                          task_type=task_type, tokenizer=plan.tokenizer if plan is not None else None,
                          expert_buffers=expert_buffers)


def _vocab_plan(base: str, base_model: nn.Module, models: dict[str, str], trust_remote_code: bool):
    """The union-vocabulary plan (:func:`adamerge.vocab.plan_vocab`), None when no fine-tune's vocabulary differs."""
    from adamerge.vocab import load_tokenizer, model_rows, plan_vocab

    rows = base_model.get_input_embeddings().weight.shape[0]
    return plan_vocab((base, load_tokenizer(base, trust_remote_code), rows),
                      {t: (s, load_tokenizer(s, trust_remote_code), model_rows(s, trust_remote_code))
                       for t, s in models.items()})
