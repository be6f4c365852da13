"""Representation Surgery on top of any exported merge: per-task adapters trained to match the individual models.

The merged encoder comes from a checkpoint written by ``adamerge fit``/``merge`` (any method; its manifest must name
the same base and fine-tunes, checked by content hash) and stays frozen. Each step, on the same unlabeled rows, the
merged feature ``z`` and each individual model's feature ``z_t`` are computed under ``no_grad``: the individual model
is the base plus its stored task vector (one-hot coefficients over the pool's stacked task vectors — no extra model
copies are held). Only the adapters train (L1 loss, Adam). Both forwards need no backward pass, so a Surgery step
costs about two inference passes of the batch; the transient memory is one materialised set of weights.

The feature is the backbone output that the heads read: ``pooler_output`` where the backbone has a pooler (BERT),
otherwise ``last_hidden_state`` (every non-pad token, L1 averaged over valid tokens) -- also when each head holds its
own pooler (``heads: {pooler: true}``), which then runs on the corrected tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.core.modules import slice_output
from adamerge.errors import MergeInputError
from adamerge.io.manifest import MANIFEST, task_buffers
from adamerge.io.safetensors import read_weights
from adamerge.kinds.headed import owns_pooler
from adamerge.methods.base import MergeModule
from adamerge.objectives import l1_distance
from adamerge.parametrize.surgery import ADAPTERS, SURGERY_EXPORT, SurgeryAdapter, feature_field, replace_field

FEATURES = ("auto", "pooler_output", "last_hidden_state")


class Surgery(MergeModule):
    """Representation Surgery adapters over a frozen merged encoder.

    Args:
        base: the pretrained model (hub id, directory or ``.safetensors``).
        models: task name → fine-tuned model (the same as the merge's).
        merged: directory of an exported merge (its ``model.safetensors`` is the frozen merged encoder).
        rank: adapter bottleneck r.
        feature: ``auto``, ``pooler_output`` or ``last_hidden_state``.
        lr: learning rate of the adapters.
        shared: the arguments every method takes (``tv_dtype``, ``task_type``, ``heads``, ``optimizer``, ...; see
            :class:`~adamerge.methods.base.MergeModule`).
    """

    method = "surgery"
    extension = SURGERY_EXPORT  # adapters: exported, carded and served by adamerge.parametrize.surgery

    def __init__(
        self,
        base: str,
        models: dict[str, str],
        merged: str,
        rank: int = 16,
        feature: str = "auto",
        lr: float = 1e-3,
        **shared,
    ) -> None:
        if feature not in FEATURES:
            raise MergeInputError(f"feature: unknown value {feature!r}; allowed: {', '.join(FEATURES)}")
        if rank < 1:
            raise MergeInputError(f"rank must be >= 1, got {rank}")
        if shared.get("prep"):
            raise MergeInputError(
                "prep: Surgery trains adapters over an exported merge (`merged`), whose own prep "
                "was applied when it was merged; leave prep unset here"
            )
        super().__init__(base, models, **shared)
        self.merged.coefficients.requires_grad_(False)
        self.feature = feature
        if any(owns_pooler(h) for h in self.merged.heads.values()):  # heads: {pooler: true}
            if feature == "pooler_output":
                raise MergeInputError(
                    "feature: pooler_output is computed by each task's own pooler here (heads: "
                    "{pooler: true}), after the adapter would act; use feature: auto or "
                    "last_hidden_state"
                )
            self.feature = "last_hidden_state"
        self.base_manifest = self._check_source(Path(merged))
        state = read_weights(merged)
        params = dict(self.merged.backbone.named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise MergeInputError(f"merged checkpoint {merged}: missing tensors {missing[:5]}")
        buffers = {n: b for n, b in self.merged.backbone.named_buffers() if b.is_floating_point() and n in state}
        self._held = [*self.merged.param_names, *buffers]  # the merge's weights and its buffers (BatchNorm statistics)
        for name in self._held:
            ref = params[name] if name in params else buffers[name]
            self.register_buffer(f"merged_{name.replace('.', '__')}", state[name].to(ref.dtype), persistent=False)
        # a merge exported with per-task BatchNorm statistics: each task's rows run with its own
        self.batchnorm.task_stats = {
            t: b for t in self.task_names if (b := task_buffers(merged, t, self.base_manifest))
        }
        dim = self.merged.kind.feature_dim(self.merged.backbone)
        self.adapters = nn.ModuleDict({t: SurgeryAdapter(dim, rank) for t in self.task_names})

    def _check_source(self, path: Path) -> dict:
        if not (path / MANIFEST).is_file():
            raise MergeInputError(f"merged: {path} is not an adamerge checkpoint ({MANIFEST} missing)")
        manifest = json.loads((path / MANIFEST).read_text())
        ours = self.merged.pool_info["hashes"]
        theirs = {s["task"]: s["sha256"] for s in manifest["sources"]}
        if manifest["base"]["sha256"] != ours["base"] or any(theirs.get(t) != ours[t] for t in self.task_names):
            raise MergeInputError(
                f"merged: {path} was merged from other models than base/models given here (content hashes differ)"
            )
        return manifest

    def merged_state(self) -> dict[str, Tensor]:
        return {n: getattr(self, f"merged_{n.replace('.', '__')}") for n in self._held}

    @torch.no_grad()
    def final_merged_params(self) -> dict[str, Tensor]:
        return self.merged_state()

    def export_params(self) -> dict[str, Tensor]:
        return self.merged_state()  # already held (the frozen merged encoder)

    def recalibrate_batchnorm(self, batches: list[dict]) -> None:
        """Nothing to re-estimate: the frozen merge's BatchNorm statistics (one set, or each task's own) came with
        its export, which re-estimated them under its weights."""

    def manifest_fields(self):
        base = self.base_manifest
        return {
            "base_merge": {k: base.get(k) for k in ("method", "coefficients", "prep", *base.get("settings", ()))},
            "surgery": {
                "rank": self.hparams.rank,
                "feature": self.hparams.feature,
                "lr": self.hparams.lr,
                "adapters": ADAPTERS,
            },
        }

    def extra_export_files(self) -> dict[str, dict[str, Tensor]]:
        return {ADAPTERS: {f"{t}/{k}": v for t, a in self.adapters.items() for k, v in a.state_dict().items()}}

    def predict(self, task: str, inputs, params=None) -> Tensor:
        params = params or self.task_params(task, self.merged_state())
        feats = functional_call(self.merged.backbone, params, args=(), kwargs=dict(inputs))
        field = feature_field(feats, self.feature)
        feats = replace_field(feats, field, self.adapters[task](feats[field]))
        return self.merged.head_logits(task, feats, inputs)

    def surgery_loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ_t L1(adapter_t(z_merged), z_t) over the step's rows, and the per-task terms."""
        inputs = batch["inputs"]
        with torch.no_grad():  # per-task BatchNorm statistics: each task's rows through the merge with its own
            whole = (
                None
                if self.batchnorm.task_stats
                else functional_call(self.merged.backbone, self.merged_state(), args=(), kwargs=dict(inputs))
            )
        losses, start, all_sum = {}, 0, self.data_parallel_sum()
        for task, n in zip(batch["tasks"], batch["sizes"]):
            sl = slice(start, start + n)
            rows = {k: v[sl] for k, v in inputs.items()}
            with torch.no_grad():
                out = (
                    slice_output(whole, sl)
                    if whole is not None
                    else functional_call(
                        self.merged.backbone, self.task_params(task, self.merged_state()), args=(), kwargs=rows
                    )
                )
                field = feature_field(out, self.feature)
                z = out[field]
                teacher = functional_call(self.merged.backbone, self.merged.expert_params(task), args=(), kwargs=rows)[
                    field
                ]
            losses[task] = l1_distance(self.adapters[task](z), teacher, rows.get("attention_mask"), all_sum)
            start += n
        return sum(losses.values()), losses

    def training_step(self, batch, batch_idx):
        loss, losses = self.surgery_loss(batch)
        self.log_step(loss, losses, batch, name="l1")
        return loss
