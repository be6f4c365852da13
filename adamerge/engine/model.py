"""MergedModel: the base backbone run with merged weights via ``torch.func.functional_call``.

One call merges every tensor once (``θ0 + Σ_t λ_t τ_t``, one ``tensordot`` each), runs **one** backbone forward over
the concatenation of all tasks' inputs, and applies each task's frozen head to its slice. Gradients flow to the
coefficients (and masks) only; the base weights and task vectors are frozen buffers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from adamerge.core.functional import LookupWeight, merge_dense
from adamerge.core.modules import block_of, cat_outputs, slice_output
from adamerge.engine.stores import TaskVectorStore, _is_sharded
from adamerge.kinds import get_kind
from adamerge.parametrize import Coefficients
from adamerge.pool import TaskVectorPool

RECOMPUTE = (None, "activations", "merge")  # what the backward re-runs per layer (MergedModel.features)


class MergedModel(nn.Module):
    """Frozen base + stacked task vectors behind coefficients; forward returns per-task logits.

    Args:
        pool: the loaded models (see :func:`adamerge.pool.load_pool`).
        coefficients: the coefficient parametrisation; its ``[T, P]`` matrix follows ``pool.param_names``.
    """

    def __init__(self, pool: TaskVectorPool, coefficients: Coefficients) -> None:
        super().__init__()
        self.pool_info = {"base": pool.base_source, "sources": pool.sources, "hashes": pool.hashes}
        self.task_names = list(pool.task_names)
        self.param_names = pool.param_names
        self.backbone = pool.backbone.requires_grad_(False)
        self.heads = nn.ModuleDict(pool.heads).requires_grad_(False)
        self.coefficients = coefficients
        self.masks: Mapping[str, Tensor] | None = None  # optional per-tensor masks, set by mask parametrisations
        self.task_type = pool.task_type
        self.kind = get_kind(pool.task_type)
        self.tokenizer = pool.tokenizer  # the union tokenizer when fine-tunes added tokens, else None (the base's)
        self.expert_buffers = pool.expert_buffers  # task -> buffers of its fine-tune that differ from the base's
        self.expert_stores: nn.ModuleList | None = None  # the fine-tunes' own task vectors (set_expert_vectors)
        blocks: dict[str, list[str]] = {}
        for n in self.param_names:
            blocks.setdefault(block_of(n), []).append(n)
        self.stores = nn.ModuleList(
            TaskVectorStore(names, pool.task_vectors, pool.low_rank) for names in blocks.values()
        )
        index = {n: p for p, n in enumerate(self.param_names)}
        # each store's columns of the [T, P] coefficients: a slice when contiguous (a view: no index kernel and no
        # host-to-device copy per step), else an index tensor that moves with the module
        self._columns: list[slice | str] = []
        for i, st in enumerate(self.stores):
            cols = [index[n] for n in st.names]
            if cols == list(range(cols[0], cols[0] + len(cols))):
                self._columns.append(slice(cols[0], cols[0] + len(cols)))
            else:
                self.register_buffer(f"_cols_{i}", torch.tensor(cols), persistent=False)
                self._columns.append(f"_cols_{i}")
        self._store_of = {n: st for st in self.stores for n in st.names}
        self._index = index  # tensor name -> its column of the coefficients
        # weights of embedding layers (used by nothing else): a training step merges only the rows its tokens read
        shared = {}
        for _, p in self.backbone.named_parameters(remove_duplicate=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
        tables = {
            f"{m}.weight" if m else "weight": mod
            for m, mod in self.backbone.named_modules()
            if isinstance(mod, nn.Embedding)
        }
        self.lookup_tables = [n for n, mod in tables.items() if n in index and shared.get(id(mod.weight)) == 1]
        self.row_lookup = True  # False: merge lookup tables whole like every other tensor
        # what a forward that records gradients recomputes in the backward, layer by layer (None, "activations",
        # "merge": see :meth:`features`); the layers it can do so for, as (store index, module path)
        self.recompute: str | None = None
        self.layer_stores = self._find_layer_stores(shared)
        # each such layer's class forward, for the call inside its checkpoint (a plain dict: not in the state dict)
        self._plain_calls = {path: _ClassForward(self.backbone.get_submodule(path)) for _, path in self.layer_stores}
        # a causal LM's key/value cache would be extended again by each layer's re-run: switched off then
        self._takes_use_cache = "use_cache" in inspect.signature(self.backbone.forward).parameters
        self.eval()

    def _find_layer_stores(self, shared: Mapping[int, int]) -> list[tuple[int, str]]:
        """Stores whose tensors are exactly the parameters of one numbered submodule (``encoder.layer.3``) that no
        other module shares: those a forward can merge inside the layer's own call."""
        out = []
        modules = dict(self.backbone.named_modules())
        for i, st in enumerate(self.stores):
            path = block_of(st.names[0])
            layer = modules.get(path)
            if layer is None or not path.split(".")[-1].isdigit() or any(n in self.lookup_tables for n in st.names):
                continue
            own = {f"{path}.{n}": p for n, p in layer.named_parameters()}
            if set(st.names) <= set(own) and all(shared.get(id(own[n])) == 1 for n in st.names):
                out.append((i, path))
        return out

    @property
    def low_rank_names(self) -> list[str]:
        return [n for st in self.stores for n in st.lr_keys]

    def low_rank_factors(self, name: str) -> tuple[Tensor, Tensor]:
        st = self._store_of[name]
        return tuple(getattr(st, k) for k in st.lr_keys[name])

    def task_vector(self, name: str) -> Tensor:
        """The ``[T, ...]`` stack of ``name`` (a dense copy when stored sparse)."""
        return self._store_of[name].dense(name)

    def task_vectors(self) -> dict[str, Tensor]:
        """The dense stacked task vectors, sparse-stored ones densified (LoRA factors: :meth:`low_rank_factors`)."""
        return {n: self.task_vector(n) for st in self.stores for n in st.names if n not in st.lr_keys}

    def set_task_vectors(self, task_vectors: Mapping[str, Tensor]) -> None:
        """Replace the dense stacked task vectors (e.g. after TIES/DARE pre-processing)."""
        for st in self.stores:
            for n in st.names:
                if n not in st.lr_keys:
                    st.set_dense(n, task_vectors[n])

    def set_expert_vectors(self, task_vectors: Mapping[str, Tensor]) -> None:
        """Keep the fine-tunes' own (dense) task vectors for :meth:`expert_params`, where the merge's stores hold
        processed ones (TIES, DARE, a subspace decomposition): an expert is then its fine-tune exactly."""
        self.expert_stores = nn.ModuleList(TaskVectorStore(st.names, dict(task_vectors), {}) for st in self.stores)

    def offload_task_vectors(self) -> None:
        """Keep every task-vector stack in (pinned) CPU memory, streamed to the device per block (see
        :meth:`TaskVectorStore.offload`)."""
        for st in (*self.stores, *(self.expert_stores or ())):
            st.offload()

    def to_sparse_storage(self) -> None:
        """Keep the dense task vectors as their non-zero entries
        (:class:`~adamerge.core.functional.SparseStack`)."""
        for st in self.stores:
            st.to_sparse()

    def task_vector_bytes(self) -> int:
        """Bytes held by the stored task vectors (dense stacks, sparse entries and positions, LoRA factors)."""
        return sum(t.numel() * t.element_size() for st in self.stores for t in (*st.parameters(), *st.buffers()))

    def merged_params(
        self,
        coefficients: Tensor | None = None,
        masks: Mapping[str, Tensor] | None = None,
        lookup: bool = False,
        lookup_coefficients: Tensor | None = None,
        defer: Collection[int] = (),
        stores: Sequence[TaskVectorStore] | None = None,
    ) -> dict[str, Tensor]:
        """``{name: θ0 + Σ_t λ[t, p] (m ⊙ τ_t)}`` for every merged tensor; ``coefficients`` is ``[T, P]``.

        ``lookup``: embedding tables come back as :class:`~adamerge.core.functional.LookupWeight` (only the rows a
        forward
        reads are merged; whole where a mask, sparse or low-rank storage or sharding rules it out), their graph
        going to ``lookup_coefficients`` (default: the same coefficients). ``defer``: indices of stores left out
        (merged later, inside their layer's call). ``stores``: other task vectors laid out block by block like
        :attr:`stores` (the experts' own: :meth:`expert_params`); no row lookup over them."""
        lam = self.coefficients() if coefficients is None else coefficients
        masks = self.masks if masks is None else masks
        base = dict(self.backbone.named_parameters())
        rows = self.row_lookup_names(masks) if lookup and stores is None else []
        out = {}
        for i, store in enumerate(self.stores if stores is None else stores):
            if i in defer:
                continue
            out.update(store(base, self._store_columns(lam, i), masks, skip=rows))
        if rows:
            lam_rows = lam if lookup_coefficients is None else lookup_coefficients
            for n in rows:
                stack, col = self._store_of[n].dense(n), lam_rows[:, self._index[n]]
                out[n] = LookupWeight(
                    base[n], stack, col, lambda b=base[n], s=stack, c=col: merge_dense([b], [s], c[:, None])[0]
                )
        return out

    def _store_columns(self, lam: Tensor, i: int) -> Tensor:
        """Store ``i``'s columns of the ``[T, P]`` coefficients."""
        cols = self._columns[i]
        return lam[:, cols if isinstance(cols, slice) else getattr(self, cols).to(lam.device)]

    def row_lookup_names(self, masks: Mapping[str, Tensor] | None = None) -> list[str]:
        """The embedding tables that :meth:`merged_params` can merge row by row now (see ``lookup``)."""
        if not self.row_lookup:
            return []
        out = []
        for n in self.lookup_tables:
            st = self._store_of[n]
            if n in st.dense_keys and not (masks and n in masks) and not _is_sharded(getattr(st, st.dense_keys[n])):
                out.append(n)
        return out

    def lazy_merged_params(
        self, coefficients: Tensor | None = None, masks: Mapping[str, Tensor] | None = None
    ) -> LazyMerge:
        """:meth:`merged_params` as a mapping that merges one block (one store) when one of its tensors is read and
        keeps only that block: an export streams the merged model without a second full copy of it."""
        lam = (self.coefficients() if coefficients is None else coefficients).detach()
        return LazyMerge(self, lam, self.masks if masks is None else masks)

    def features(
        self,
        inputs: Mapping[str, Tensor],
        coefficients: Tensor | None = None,
        masks=None,
        params: Mapping[str, Tensor] | None = None,
    ):
        """Backbone output (a ModelOutput) of the merged model on ``inputs`` (``params``: already merged weights).

        :attr:`recompute`, in a forward that records gradients, for the repeated layers (:attr:`layer_stores`):
        ``"activations"`` — each layer runs under a non-reentrant activation checkpoint and again in the backward,
        so only its input is kept, not its activations; ``"merge"`` — each layer also merges its own weights inside
        that checkpoint, again in the backward, so the merged weights are not kept either (given ``params`` are
        bound as given, as with ``"activations"``). The other tensors (embeddings, pooler) are merged up front."""
        kwargs = dict(inputs)
        if not (self.recompute and torch.is_grad_enabled() and self.layer_stores):
            params = self.merged_params(coefficients, masks, lookup=True) if params is None else params
            return functional_call(self.backbone, dict(params), args=(), kwargs=kwargs)
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        layers = dict(self.layer_stores)
        if params is None and self.recompute == "merge":
            lam = self.coefficients() if coefficients is None else coefficients
            masks = self.masks if masks is None else masks
            base = dict(self.backbone.named_parameters())
            params = self.merged_params(lam, masks, lookup=True, defer=layers)
            weights = {i: partial(self.stores[i], base, self._store_columns(lam, i), masks) for i in layers}
        else:
            params = self.merged_params(coefficients, masks, lookup=True) if params is None else params
            weights = {i: partial(_select, params, self.stores[i].names) for i in layers}
        with self._checkpointed_layers(weights):
            return functional_call(self.backbone, dict(params), args=(), kwargs=kwargs)

    @contextmanager
    def _checkpointed_layers(self, weights: Mapping[int, Callable[[], dict[str, Tensor]]]):
        """Inside the block, each layer of :attr:`layer_stores` runs under an activation checkpoint with the
        weights that ``weights[store index]()`` returns inside it (see :meth:`features`)."""
        patched = []
        try:
            for i, path in self.layer_stores:
                call = self._plain_calls[path]
                patched.append((call.layer, call.layer.__dict__.get("forward")))
                call.layer.forward = partial(_checkpointed_layer, call, weights[i], len(path) + 1)
            yield
        finally:
            for layer, previous in patched:
                del layer.forward
                if previous is not None:
                    layer.forward = previous

    def head_logits(
        self, task: str, features, inputs: Mapping[str, Tensor], heads: Mapping[str, nn.Module] | None = None
    ) -> Tensor:
        """Apply task ``task``'s head (from ``heads``, default the model's own) to backbone ``features`` of ``inputs``
        (kinds without per-task heads: the backbone's own logits)."""
        heads = self.heads if heads is None else heads
        return self.kind.head_logits(heads[task] if task in heads else None, features, inputs)

    def feature_tensor(self, output) -> Tensor:
        """The backbone feature that the heads read (the kind's ``feature_field``: ``pooler_output`` where the
        backbone has one, otherwise ``last_hidden_state``, token features ``[n, L, d]``)."""
        return getattr(output, self.kind.feature_field(output))

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        tasks: list[str],
        sizes: list[int],
        coefficients: Tensor | None = None,
        masks=None,
        return_features: bool = False,
        params: Mapping[str, Tensor] | None = None,
        per_task: bool = False,
        task_params: Mapping[str, Mapping[str, Tensor]] | None = None,
    ):
        """Per-task logits for a batch that concatenates ``sizes[i]`` rows of task ``tasks[i]``.

        Returns ``{task: logits}`` (and the backbone features if ``return_features``).

        ``per_task``: run the backbone on each task's rows on their own (under one merge), so that BatchNorm layers
        normalising with batch statistics see one task's rows at a time; ``task_params``: per task, tensors that
        replace the merged ones for its rows (e.g. its own BatchNorm running statistics).
        """
        if per_task or task_params:
            return self._forward_per_task(
                inputs, tasks, sizes, coefficients, masks, return_features, params, task_params or {}
            )
        feats = self.features(inputs, coefficients, masks, params)
        out, start = {}, 0
        for task, n in zip(tasks, sizes):
            sl = slice(start, start + n)
            out[task] = self.head_logits(task, slice_output(feats, sl), {k: v[sl] for k, v in inputs.items()})
            start += n
        return (out, feats) if return_features else out

    def _forward_per_task(self, inputs, tasks, sizes, coefficients, masks, return_features, params, task_params):
        recomputed = self.recompute == "merge" and torch.is_grad_enabled() and self.layer_stores
        if params is None and not recomputed:  # merged once for every task's rows
            params = self.merged_params(coefficients, masks, lookup=True)
        out, feats, start = {}, [], 0
        for task, n in zip(tasks, sizes):
            sl = slice(start, start + n)
            rows = {k: v[sl] for k, v in inputs.items()}
            own = params
            if task in task_params:
                if params is None:
                    raise ValueError(
                        "task_params need merged weights: not with recompute='merge' in a forward "
                        "that records gradients"
                    )
                own = {**params, **task_params[task]}
            logits, f = self.forward(rows, [task], [n], coefficients, masks, return_features=True, params=own)
            out.update(logits)
            feats.append(f)
            start += n
        return (out, cat_outputs(feats)) if return_features else out

    def chunked_surrogate(self, batch: Mapping, loss_fn, chunks: int, pieces: int = 1):
        """Merge once, then run the tasks in ``chunks`` groups, each forward+backward on its own, to bound activation
        memory by one group's. Each group's backward stops at detached copies of the merged weights and accumulates
        ``dL/dW`` there; the returned surrogate ``Σ_p ⟨W_p, dL/dW_p⟩`` has the same gradient with respect to the
        coefficients (and masks) as the loss itself, so one ``backward()`` of it — Lightning's — finishes the step.
        Embedding tables merged row by row (``lookup`` in :meth:`merged_params`) send their part of the gradient to a
        detached copy of the coefficients instead, which enters the surrogate as ``⟨λ, dL/dλ⟩``.

        ``pieces > 1`` splits each task's rows into that many contiguous pieces run one at a time (within its group),
        each piece's loss and terms weighted by its share of the task's rows: exact for objectives whose per-task
        term is a mean of per-row terms (the caller checks).

        With :attr:`recompute` ``"merge"``, nothing is merged up front: each group merges what it reads from detached
        copies of the coefficients (and of trained masks), layer by layer inside activation checkpoints (see
        :meth:`features`), and the surrogate is ``⟨λ, dL/dλ⟩`` (+ ``⟨m, dL/dm⟩``): neither the merged weights nor
        their gradients are kept, at the cost of merging the layers twice per group.

        ``loss_fn(sub_batch, **merge_kw) -> (loss, per_task)`` runs the forward of ``sub_batch`` with the merge
        given by ``merge_kw`` (``params``: merged weights; or ``coefficients`` and ``masks``). Returns
        ``(surrogate, loss, per_task)``.
        """
        lam = self.coefficients()
        if self.recompute == "merge" and self.layer_stores:
            leaves = {"coefficients": lam.detach().requires_grad_(True)}
            trained_masks = {n: m for n, m in (self.masks or {}).items() if m.requires_grad}
            if self.masks is not None:
                leaves["masks"] = {
                    **self.masks,
                    **{n: m.detach().requires_grad_(True) for n, m in trained_masks.items()},
                }
            total, per_task = self._run_groups(batch, loss_fn, leaves, chunks, pieces)
            surrogate = (lam * leaves["coefficients"].grad).sum() if leaves["coefficients"].grad is not None else 0.0
            for n, m in trained_masks.items():
                if leaves["masks"][n].grad is not None:
                    surrogate = surrogate + (m * leaves["masks"][n].grad).sum()
            return surrogate, total, per_task
        lam_rows = lam.detach().requires_grad_(True)  # the embedding rows' graph stops here, once per group
        params = self.merged_params(lam, lookup=True, lookup_coefficients=lam_rows)
        leaves = {n: p if isinstance(p, LookupWeight) else p.detach().requires_grad_(True) for n, p in params.items()}
        total, per_task = self._run_groups(batch, loss_fn, {"params": leaves}, chunks, pieces)
        surrogate = sum(
            (params[n] * leaves[n].grad).sum()
            for n in params
            if not isinstance(leaves[n], LookupWeight) and leaves[n].grad is not None
        )
        if lam_rows.grad is not None:
            surrogate = surrogate + (lam * lam_rows.grad).sum()
        return surrogate, total, per_task

    @staticmethod
    def _run_groups(batch: Mapping, loss_fn, merge_kw: dict, chunks: int, pieces: int):
        """Forward+backward of each group of :meth:`chunked_surrogate` under ``merge_kw``; ``(loss, per_task)``."""
        tasks, sizes = list(batch["tasks"]), list(batch["sizes"])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        per = -(-len(tasks) // max(1, chunks))
        groups = []  # (tasks, row ranges, weight)
        for g in range(0, len(tasks), per):
            members = range(g, min(g + per, len(tasks)))
            if pieces <= 1:
                groups.append(([tasks[i] for i in members], [(starts[i], starts[i] + sizes[i]) for i in members], 1.0))
                continue
            for i in members:
                bounds = [starts[i] + round(k * sizes[i] / pieces) for k in range(pieces + 1)]
                groups += [([tasks[i]], [(a, b)], (b - a) / sizes[i]) for a, b in zip(bounds, bounds[1:]) if b > a]
        total, per_task = 0.0, {}
        for names, ranges, weight in groups:
            rows = torch.cat([torch.arange(a, b) for a, b in ranges])
            sub = {
                "inputs": {k: v[rows.to(v.device)] for k, v in batch["inputs"].items()},
                "tasks": names,
                "sizes": [b - a for a, b in ranges],
            }
            loss, terms = loss_fn(sub, **merge_kw)
            (loss * weight if weight != 1.0 else loss).backward()
            total = total + weight * loss.detach()
            for t, v in terms.items():
                per_task[t] = per_task.get(t, 0.0) + weight * v.detach()
        return total, per_task

    def expert_params(self, task: str) -> dict[str, Tensor]:
        """The weights (and buffers, e.g. BatchNorm statistics) of fine-tune ``task`` itself: its one-hot merge
        (over its own task vector where the stores hold processed ones: :meth:`set_expert_vectors`) with its own
        buffers where they differ from the base's."""
        params = self.merged_params(self.one_hot(task), masks={}, stores=self.expert_stores)
        device = next(iter(params.values())).device
        params.update({n: b.to(device) for n, b in self.expert_buffers.get(task, {}).items()})
        return params

    def one_hot(self, task: str) -> Tensor:
        """``[T, P]`` coefficients that select fine-tune ``task`` exactly."""
        lam = torch.zeros(len(self.task_names), len(self.param_names), device=self.coefficients.weight.device)
        lam[self.task_names.index(task)] = 1.0
        return lam


class _ClassForward(nn.Module):
    """Calls its layer's class ``forward`` (not the instance attribute that :meth:`MergedModel._checkpointed_layers`
    sets), under parameters that ``functional_call`` binds by the names ``layer.<name>``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return type(self.layer).forward(self.layer, *args, **kwargs)


def _select(params: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    return {n: params[n] for n in names}


def _checkpointed_layer(call: _ClassForward, weights: Callable[[], dict[str, Tensor]], cut: int, *args, **kwargs):
    """One layer's call under a non-reentrant activation checkpoint, with the weights ``weights()`` returns inside
    it (again in the backward's re-run)."""

    def run(*a, **kw):
        return functional_call(call, {f"layer.{n[cut:]}": w for n, w in weights().items()}, args=a, kwargs=kw)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


class LazyMerge(Mapping):
    """Merged tensors of a :class:`MergedModel`, merged one block at a time on access (see
    :meth:`MergedModel.lazy_merged_params`). Reading the tensors in model order merges each block once."""

    def __init__(self, model: MergedModel, lam: Tensor, masks: Mapping[str, Tensor] | None) -> None:
        self._model, self._lam, self._masks = model, lam, masks
        self._base = dict(model.backbone.named_parameters())
        self._index = {n: i for i, st in enumerate(model.stores) for n in st.names}  # tensor -> its store
        self._block: tuple[int, dict[str, Tensor]] | None = None

    def __getitem__(self, name: str) -> Tensor:
        m = self._model
        if name not in self._index:
            raise KeyError(name)
        i = self._index[name]
        if self._block is None or self._block[0] != i:
            self._block = None  # drop the previous block before merging the next
            with torch.no_grad():
                self._block = (i, m.stores[i](self._base, m._store_columns(self._lam, i), self._masks))
        return self._block[1][name]

    def __iter__(self):
        return iter(self._model.param_names)

    def __len__(self) -> int:
        return len(self._model.param_names)

    def __contains__(self, name: object) -> bool:
        return name in self._index
