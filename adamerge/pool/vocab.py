"""Union vocabulary: fine-tunes whose tokenizers extend the base's (``tokenizer.add_tokens`` +
``model.resize_token_embeddings``) merge into one model whose vocabulary holds every token.

Rules (mergekit's ``tokenizer_source: union`` is the reference idea; the row policy is ours):

* ids below the base tokenizer's length are shared: every fine-tune must have the same token at each of them (else
  the vocabularies come from different tokenizers, an error naming both models and the first differing token); their
  embedding rows merge as usual (``θ0 + Σ_t λ_t τ_t``);
* every token a fine-tune added gets one union id, ``len(base tokenizer) + k`` in order of first appearance (task
  order, then the fine-tune's id) — the id ``add_tokens`` gives it on the base tokenizer; its row is the average of
  the rows of the fine-tunes that have it, not scaled by any coefficient (its task-vector entries are zero);
* embedding rows without a token (a checkpoint padded to a multiple) are shared rows below the base's row count and
  dropped above it; the union model has ``max(base rows, len(union tokenizer))`` rows, and ``config.vocab_size``
  says so.

Only the vocabulary tensors (input embeddings; for causal LMs the output embeddings and their bias when untied) are
remapped. The data module keeps tokenizing with the base tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from adamerge.errors import MergeInputError

log = logging.getLogger(__name__)

SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _bare(source: str) -> bool:
    """A bare ``.safetensors`` file or a LoRA adapter: no config or tokenizer of its own to read."""
    from adamerge.io.sources import is_lora_adapter

    return str(source).endswith(".safetensors") or is_lora_adapter(str(source))


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer saved with a model source, or None when it has none (a bare ``.safetensors`` file, a directory
    without tokenizer files, an adapter, a hub id not cached offline)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if _bare(source):
        return None
    if Path(source).is_dir() and not any(
        (Path(source) / f).is_file()
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "vocab.json",
            "tokenizer.model",
            "spiece.model",
        )
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, offline hub, unknown tokenizer class: no tokenizer to compare
        log.debug("no tokenizer for %s: %s", source, e)
        return None


def model_rows(source: str, trust_remote_code: bool = False) -> int | None:
    """``vocab_size`` of a model source's config (None when it has no config to read)."""
    from transformers import AutoConfig

    if _bare(source):
        return None
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


@dataclass
class VocabPlan:
    """Where every fine-tune's vocabulary rows go in the union model."""

    size: int  # rows of the union model's vocabulary tensors
    base_len: int  # len(base tokenizer): the first union-added id
    added: list[str] = field(default_factory=list)  # union-added tokens; token k has id base_len + k
    owners: dict[str, dict[int, int]] = field(default_factory=dict)  # task -> {union id: the fine-tune's row}
    tokenizer: object = None  # the union tokenizer

    @property
    def added_ids(self) -> set[int]:
        return set(range(self.base_len, self.base_len + len(self.added)))

    def remap(self, task: str, ft: Tensor, base: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """The task vector of a vocabulary tensor ``ft`` (rows along dim 0) against the union-sized ``base``, and
        this fine-tune's rows of the union-added tokens (``{union id: row}``)."""
        tv = torch.zeros_like(base)
        shared = min(ft.shape[0], base.shape[0])
        tv[:shared] = ft[:shared].to(base.dtype) - base[:shared]
        added = self.added_ids
        if added:
            tv[sorted(i for i in added if i < base.shape[0])] = 0
        rows = {u: ft[j] for u, j in self.owners.get(task, {}).items()}
        return tv, rows


def _tokens(tok) -> list[str]:
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def plan_vocab(
    base: tuple[str, object, int | None], fine_tunes: dict[str, tuple[str, object, int | None]]
) -> VocabPlan | None:
    """The union plan for ``base`` = (source, tokenizer or None, rows or None) and each task's fine-tune likewise;
    None when every vocabulary equals the base's (the common case: nothing to remap)."""
    base_source, base_tok, base_rows = base
    differs = [
        t for t, (_, _, rows) in fine_tunes.items() if rows is not None and base_rows is not None and rows != base_rows
    ]
    if base_tok is None:  # nothing to compare (as above)
        return None
    base_tokens = _tokens(base_tok)
    base_len = len(base_tokens)
    added: dict[str, int] = {}
    owners: dict[str, dict[int, int]] = {}
    sources: dict[str, tuple[str, object]] = {}  # added token -> (task, its AddedToken or None)
    for task, (source, tok, rows) in fine_tunes.items():
        if tok is None:  # nothing to compare; a different row count fails on the tensor's shape (loading checks it)
            continue
        tokens = _tokens(tok)
        for i, (a, b) in enumerate(zip(base_tokens, tokens)):
            if a != b:
                raise MergeInputError(
                    f"vocabularies differ: the base ({base_source}) and fine-tune {task!r} "
                    f"({source}) first differ at token id {i}: {a!r} vs {b!r} — they were not "
                    "built from the same tokenizer, so their embedding rows do not correspond"
                )
        if len(tokens) < base_len:
            raise MergeInputError(
                f"fine-tune {task!r} ({source}) has {len(tokens)} tokens, fewer than the base's "
                f"{base_len} ({base_source}): its vocabulary does not extend the base's"
            )
        if rows is not None and rows < len(tokens):
            raise MergeInputError(
                f"fine-tune {task!r} ({source}) has {len(tokens)} tokens but only {rows} embedding "
                "rows: resize its embeddings (model.resize_token_embeddings(len(tokenizer)))"
            )
        decoder = getattr(tok, "added_tokens_decoder", {}) or {}
        for j in range(base_len, len(tokens)):
            token = tokens[j]
            if token not in added:
                added[token] = base_len + len(added)
                sources[token] = (task, decoder.get(j))
            owners.setdefault(task, {})[added[token]] = j
    if not added and not [t for t in differs if fine_tunes[t][1] is not None]:
        return None
    size = max(base_rows or base_len, base_len + len(added))
    return VocabPlan(
        size=size,
        base_len=base_len,
        added=list(added),
        owners=owners,
        tokenizer=_union_tokenizer(base_source, base_tok, added, sources, fine_tunes),
    )


def _union_tokenizer(base_source: str, base_tok, added: dict[str, int], sources, fine_tunes):
    """The base tokenizer with every union-added token, at its union id, special where the fine-tune's was."""
    import copy

    from transformers import AddedToken

    union = copy.deepcopy(base_tok)
    for token, uid in added.items():
        task, spec = sources[token]
        special = bool(getattr(spec, "special", False))
        spec = spec if spec is not None else AddedToken(token, special=special)
        if token in (fine_tunes[task][1].all_special_tokens or []):  # listed among its special tokens: so here
            _add_special(union, spec)
        else:
            union.add_tokens([spec], special_tokens=special)
        got = union.convert_tokens_to_ids(token)
        if got != uid:
            raise MergeInputError(
                f"token {token!r} of fine-tune {task!r} ({fine_tunes[task][0]}) got id {got} in "
                f"the union tokenizer, expected {uid}"
            )
    for _task, (_, tok, _) in fine_tunes.items():  # e.g. a pad token a fine-tune added for batching
        for attr in SPECIAL_ATTRIBUTES:
            value = getattr(tok, attr, None) if tok is not None else None
            if value is not None and getattr(union, attr, None) is None:
                setattr(union, attr, str(value))
    return union


def _add_special(tok, token) -> None:
    """Append ``token`` to the extra special tokens (``replace_extra_special_tokens`` in transformers 5,
    ``replace_additional_special_tokens`` before)."""
    import inspect

    params = inspect.signature(tok.add_special_tokens).parameters
    keep = {k: False for k in ("replace_extra_special_tokens", "replace_additional_special_tokens") if k in params}
    tok.add_special_tokens({"additional_special_tokens": [token]}, **keep)


def vocab_param_names(model: nn.Module, backbone: nn.Module) -> list[str]:
    """Names (in ``backbone``) of the tensors indexed by token id: input embeddings, output embeddings and bias."""
    wanted = set()
    emb = model.get_input_embeddings()
    if emb is not None:
        wanted.add(id(emb.weight))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out, nn.Module):
        wanted.update(id(p) for p in (getattr(out, "weight", None), getattr(out, "bias", None)) if p is not None)
    return [n for n, p in backbone.named_parameters() if id(p) in wanted]


def resize_base(model: nn.Module, plan: VocabPlan) -> None:
    """Give the base model the union's row count (new rows are set from the fine-tunes later)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if plan.size != rows:
        model.resize_token_embeddings(plan.size, mean_resizing=False)
