"""Weight-ensembling MoE routing (WEMoE, Tang et al. 2024): the MLP of every routed block becomes the pretrained MLP
plus the task vectors weighted per input by a small router,

    y = W0 x + b0 + Σ_t r_t(x̄) (τW_t x + τb_t),      r = fc2(ReLU(fc1(x̄))),  x̄ = the block input averaged over tokens

for every routed ``nn.Linear`` of the block (the router reads the input of its first one, so it sees the MLP input).
:class:`RoutedMLPs` keeps the routers (trainable) and the frozen task vectors of the routed tensors — dense stacks, or
per-task rank-``k`` SVD factors (``rank``) — and applies them with forward hooks on the backbone's modules, so the
backbone runs unchanged (also under ``torch.func.functional_call`` with merged weights).

Routing is active only inside :meth:`RoutedMLPs.context` (which also carries the attention mask for the token
average); outside it the backbone is its plain self (the experts, for instance).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from adamerge.errors import MergeInputError
from adamerge.io.extensions import ExportExtension, NoHook, register_extension

WEMOE_FILE = "wemoe.safetensors"

# MLP linear layers of common architectures: BERT/RoBERTa (not the attention's output.dense), LLaMA/Mistral/Qwen,
# CLIP/ViT
DEFAULT_MODULES = (
    r"\.intermediate\.dense$",
    r"(?<!attention)\.output\.dense$",
    r"\.mlp\.(gate|up|down)_proj$",
    r"\.mlp\.fc[12]$",
)


def _key(name: str) -> str:
    return name.replace(".", "__")


def numbered_block(module: str) -> str | None:
    """The numbered layer a module belongs to (:func:`adamerge.core.modules.block_of`), None when it is outside them."""
    from adamerge.core.modules import block_of

    block = block_of(module)
    return block if block.split(".")[-1].isdigit() else None


def block_name(module: str) -> str:
    """The block (layer) a module belongs to; it must be a numbered layer."""
    block = numbered_block(module)
    if block is None:
        raise MergeInputError(f"routed module {module!r} is not inside a numbered layer")
    return block


def routed_modules(backbone: nn.Module, patterns: Sequence[str] = DEFAULT_MODULES) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``backbone`` matching any of ``patterns`` (regular expressions). The
    default patterns route the MLPs of the numbered transformer layers only, as WEMoE does: an MLP outside them
    (SigLIP's attention-pooling head) stays merged by Task Arithmetic; a pattern given by name routes what it names."""
    compiled = [re.compile(p) for p in patterns]
    names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and any(c.search(n) for c in compiled)]
    if tuple(patterns) == DEFAULT_MODULES:
        names = [n for n in names if numbered_block(n) is not None]
    if not names:
        raise MergeInputError(
            f"modules: no nn.Linear of {type(backbone).__name__} matches {list(patterns)}; name "
            "the MLP layers to route with regular expressions"
        )
    return names


class Router(nn.Module):
    """``x̄ ↦ fc2(ReLU(fc1(x̄)))`` giving T routing weights. fc1 ~ N(0, 0.01²) (as the paper), fc2's weight 0 and bias
    ``init``: at initialisation every input gets weight ``init`` on every task — exactly Task Arithmetic."""

    def __init__(self, dim: int, num_tasks: int, init: float, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, num_tasks)
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, 0.01)
            self.fc1.bias.zero_()
            self.fc2.weight.zero_()
            self.fc2.bias.fill_(init)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x.to(self.fc1.weight.dtype)
        if x.ndim > 3:  # a channels-last feature map [B, H, W, C] (ConvNeXt's pointwise layers): positions as tokens
            x = x.flatten(1, -2)
        if x.ndim == 3:
            if mask is not None and mask.shape == x.shape[:2]:
                w = mask.to(x.dtype)[..., None]
                x = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
            else:
                x = x.mean(1)
        return self.fc2(torch.relu(self.fc1(x)))


class RoutedMLPs(nn.Module):
    """Routers and frozen routed task vectors for the modules ``names`` of one backbone (see the module docstring).

    Args:
        names: routed ``nn.Linear`` module names, in model order.
        dims: input features of each module.
        task_vectors: module name → ``(τW [T, out, in], τb [T, out] or None)``.
        num_tasks: T. init: the routers' initial weight of every task. hidden: router hidden width (default: the
            block's input width). rank: keep each task's τW as its top-``rank`` SVD factors (None: dense).
    """

    def __init__(
        self,
        names: list[str],
        dims: dict[str, int],
        task_vectors: dict[str, tuple[Tensor, Tensor | None]],
        num_tasks: int,
        init: float,
        hidden: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        if rank is not None and rank < 1:
            raise MergeInputError(f"rank must be >= 1 (or null for dense task vectors), got {rank}")
        self.names, self.rank, self.num_tasks = list(names), rank, num_tasks
        self.blocks: dict[str, list[str]] = {}
        for n in self.names:
            self.blocks.setdefault(block_name(n), []).append(n)
        self.routers = nn.ModuleDict(
            {_key(b): Router(dims[mods[0]], num_tasks, init, hidden) for b, mods in self.blocks.items()}
        )
        for n in self.names:
            W, b = task_vectors[n]
            if rank is None:
                self.register_parameter(f"W_{_key(n)}", nn.Parameter(W, requires_grad=False))
            else:
                U, V = low_rank_factors(W, rank)
                self.register_parameter(f"U_{_key(n)}", nn.Parameter(U, requires_grad=False))
                self.register_parameter(f"V_{_key(n)}", nn.Parameter(V, requires_grad=False))
            if b is not None:
                self.register_parameter(f"b_{_key(n)}", nn.Parameter(b, requires_grad=False))
        self._active, self._mask, self._routes = False, None, {}
        self._handles: list = []

    # -- applying -------------------------------------------------------------------------------------------------
    def attach(self, backbone: nn.Module) -> None:
        """Register the hooks on ``backbone``'s modules (once)."""
        modules = dict(backbone.named_modules())
        for block, mods in self.blocks.items():
            self._handles.append(modules[mods[0]].register_forward_pre_hook(self._route_hook(block)))
            for n in mods:
                self._handles.append(modules[n].register_forward_hook(self._delta_hook(block, n)))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def context(self, inputs: Mapping[str, Tensor] | None = None) -> Iterator[None]:
        """Route inside the block, for a batch of ``inputs``: the router averages over their non-pad tokens (text's
        ``attention_mask``; SigLIP 2's ``pixel_attention_mask``, its patches being its tokens), or over all."""
        inputs = inputs or {}
        mask = inputs.get("attention_mask", inputs.get("pixel_attention_mask"))
        prev = (self._active, self._mask)
        self._active, self._mask = True, mask
        try:
            yield
        finally:
            self._active, self._mask = prev
            self._routes = {}

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The plain backbone inside the block (e.g. the experts)."""
        prev = self._active
        self._active = False
        try:
            yield
        finally:
            self._active = prev

    def _route_hook(self, block: str) -> Callable:
        def hook(module, args):
            if self._active:
                self._routes[block] = self.routers[_key(block)](args[0], self._mask)

        return hook

    def _delta_hook(self, block: str, name: str) -> Callable:
        def hook(module, args, output):
            if not self._active:
                return None
            return output + self.delta(name, args[0], self._routes[block])

        return hook

    def delta(self, name: str, x: Tensor, r: Tensor) -> Tensor:
        """``Σ_t r[b, t] (τW_t x_b + τb_t)`` for input ``x`` ``[B, ..., in]`` (``[B, in]``, tokens ``[B, L, in]``, a
        channels-last feature map ``[B, H, W, in]``) and routing ``r`` ``[B, T]``."""
        k = _key(name)
        r = r.to(x.dtype)
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, L, in]
        if self.rank is None:
            W = getattr(self, f"W_{k}").to(x.dtype)
            out = torch.einsum("bli,boi->blo", xs, torch.einsum("bt,toi->boi", r, W))
        else:
            U, V = getattr(self, f"U_{k}").to(x.dtype), getattr(self, f"V_{k}").to(x.dtype)
            h = torch.einsum("bli,tki->bltk", xs, V) * r[:, None, :, None]
            out = torch.einsum("bltk,tok->blo", h, U)
        b = getattr(self, f"b_{k}", None)
        if b is not None:
            out = out + (r @ b.to(x.dtype))[:, None]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    # -- export ---------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Everything :meth:`from_tensors` needs: router weights and the routed task vectors (or factors)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def info(self) -> dict:
        return {
            "modules": self.names,
            "rank": self.rank,
            "num_tasks": self.num_tasks,
            "hidden": next(iter(self.routers.values())).fc1.out_features,
            "bytes": sum(v.numel() * v.element_size() for v in self.tensors().values()),
        }

    @classmethod
    def from_tensors(cls, info: dict, tensors: dict[str, Tensor], dims: dict[str, int]) -> RoutedMLPs:
        """Rebuild from :meth:`info` and :meth:`tensors` (an export's); ``dims``: input features of each module."""
        routed = cls.__new__(cls)
        nn.Module.__init__(routed)
        routed.names, routed.rank, routed.num_tasks = list(info["modules"]), info["rank"], info["num_tasks"]
        routed.blocks = {}
        for n in routed.names:
            routed.blocks.setdefault(block_name(n), []).append(n)
        # each router's hidden width from its saved weights: by default a block's own width, which differs between
        # the stages of hierarchical models (Swin); ``info["hidden"]`` is the first router's
        routed.routers = nn.ModuleDict(
            {
                _key(b): Router(dims[mods[0]], routed.num_tasks, 0.0, tensors[f"routers.{_key(b)}.fc1.weight"].shape[0])
                for b, mods in routed.blocks.items()
            }
        )
        routed.routers.load_state_dict(
            {k[len("routers.") :]: v for k, v in tensors.items() if k.startswith("routers.")}
        )
        for key, t in tensors.items():
            if not key.startswith("routers."):
                routed.register_parameter(key, nn.Parameter(t, requires_grad=False))
        routed._active, routed._mask, routed._routes, routed._handles = False, None, {}, []
        return routed


def low_rank_factors(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Per task, the best rank-``rank`` approximation of ``W[t]`` as ``U [T, out, k]`` (singular values folded in)
    and ``V [T, k, in]``."""
    Us, Vs = [], []
    for t in range(W.shape[0]):
        u, s, vh = torch.linalg.svd(W[t].float(), full_matrices=False)
        k = min(rank, s.numel())
        Us.append(u[:, :k] * s[:k])
        Vs.append(vh[:k])
    return torch.stack(Us).to(W.dtype), torch.stack(Vs).to(W.dtype)


class RoutingHook(NoHook):
    """Serves a WEMoE export: its routers and routed task vectors hooked into the backbone, active around each call."""

    def __init__(self, routing: RoutedMLPs) -> None:
        super().__init__()
        self.routing = routing

    def context(self, inputs):
        return self.routing.context(inputs)


def serve_routing(path: Path, info: dict, backbone: nn.Module, dtype: torch.dtype) -> RoutingHook:
    modules = dict(backbone.named_modules())
    routing = RoutedMLPs.from_tensors(
        info, load_file(str(Path(path) / info["file"])), {n: modules[n].in_features for n in info["modules"]}
    ).to(dtype)
    routing.attach(backbone)
    return RoutingHook(routing)


WEMOE_EXPORT = register_extension(
    ExportExtension(
        key="wemoe",
        module=__name__,
        serve=serve_routing,
        show_settings=False,
        card=lambda info: (
            "This is a WEMoE merge: its MLPs are routed per input (`wemoe.safetensors`: routers and the "
            f"routed task vectors, {info['bytes'] / 2**20:.1f} MiB). Stock `transformers` loads the shared "
            "weights but would run the pretrained MLPs unrouted: serve it with "
            "`adamerge.load_merged(path)`.\n"
        ),
    )
)
