"""Lightning callbacks: export on fit end, coefficient heatmaps, label-free step selection (and early stopping on it),
learning-rate schedule."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping

from adamerge.checkpoint.card import heatmap_png
from adamerge.core.modules import eval_mode
from adamerge.errors import MergeInputError
from adamerge.methods.selection import check_criterion
from adamerge.training.datamodule import UnlabeledDataModule

log = logging.getLogger(__name__)


class ExportOnFitEnd(pl.Callback):
    """Write the flattened merged checkpoint when training ends (global rank 0 only). ``adamerge merge`` takes the
    same arguments as top-level keys.

    Args:
        output_dir: target directory (must not exist unless ``overwrite``).
        overwrite: replace an existing ``output_dir``.
        per_task_models: also write ``tasks/<task>/``, a complete sequence-classification checkpoint per task.
        lora_adapters: for merges of LoRA adapters, also write ``adapters/<task>/`` PEFT adapters.
        model_card: write ``README.md``, a Hub model card (front matter, sources, coefficients, data, config).
        max_shard_size: largest weights file, e.g. ``"5GB"`` (as ``transformers``), ``"500MB"``; a larger model is
            written as ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
        dtype: dtype of the stored weights: ``float32``, ``bfloat16`` or ``float16``.
        push_to_hub: a Hub repo id (``user/name``): upload the finished export there (token: ``HF_TOKEN`` or
            ``hf auth login``).
        hub_private: create the Hub repo private (when it does not exist yet).
        hub_revision: upload to this branch (created if missing) instead of the main branch.
        bn_batches: for backbones with BatchNorm layers (image models): re-estimate their running statistics under
            the merge on this many steps of the unlabeled data before exporting (0: keep the base's statistics).
            Needs data (``adamerge merge``: a ``data`` section).
    """

    def __init__(
        self,
        output_dir: str = "runs/merged",
        overwrite: bool = False,
        per_task_models: bool = True,
        lora_adapters: bool = False,
        model_card: bool = True,
        max_shard_size: str = "5GB",
        dtype: str = "float32",
        push_to_hub: str | None = None,
        hub_private: bool = False,
        hub_revision: str | None = None,
        bn_batches: int = 16,
    ) -> None:
        from adamerge.checkpoint.writer import ExportOptions

        if bn_batches < 0:
            raise MergeInputError(f"bn_batches must be >= 0, got {bn_batches}")
        self.bn_batches = bn_batches
        self.output_dir, self.overwrite = output_dir, overwrite
        self.options = asdict(
            ExportOptions(
                per_task_models,
                lora_adapters,
                model_card,
                max_shard_size,
                dtype,
                push_to_hub,
                hub_private,
                hub_revision,
            )
        )

    def recalibrate(self, module, datamodule) -> None:
        """Re-estimate the merge's BatchNorm statistics on the first ``bn_batches`` steps of ``datamodule``."""
        if not self.bn_batches or not module.has_batchnorm():
            return
        if not isinstance(datamodule, UnlabeledDataModule):
            log.warning(
                "the backbone has BatchNorm layers but no data was given: the export keeps the base's running "
                "statistics"
            )
            return
        module.recalibrate_batchnorm(datamodule.first_steps(self.bn_batches))

    def export(self, module, write: bool = True, entries: dict | None = None):
        """Export ``module`` with the manifest ``entries`` the run hands over (:func:`run_entries`)."""
        return module.export(self.output_dir, overwrite=self.overwrite, write=write, entries=entries, **self.options)

    @property
    def trained_state_path(self) -> Path:
        """Where the trained state is saved before the export is attempted: ``<output_dir>.trained.ckpt``."""
        out = Path(self.output_dir)
        return out.with_name(out.name + ".trained.ckpt")

    def on_fit_start(self, trainer, pl_module) -> None:
        # fail before hours of training, not after (on every rank, so none waits for a rank that stopped)
        if Path(self.output_dir).exists() and not self.overwrite:
            raise MergeInputError(f"output_dir {self.output_dir} already exists; set overwrite: true to replace it")
        if trainer.max_steps == 0:
            raise MergeInputError(
                "trainer.max_steps is 0: nothing would be trained (use `adamerge merge` for a data-free merge)"
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        # the trained state first (a small Lightning checkpoint: trainable tensors, optimizer, step), so a failing
        # export never loses the training; `--ckpt_path` on the same config exports it again without training
        dm = trainer.datamodule
        ckpt = self.trained_state_path
        trainer.save_checkpoint(ckpt)
        from adamerge.io.hub import UploadError

        try:
            self.recalibrate(pl_module, dm)
            # every rank gathers (collective when FSDP2 shards the model); global rank 0 writes
            self.export(pl_module, write=trainer.is_global_zero, entries=run_entries(trainer))
        except UploadError:
            self._drop(trainer, ckpt)  # the export is complete; only the upload failed (its message says how to retry)
            raise
        except Exception as e:
            wrapper = MergeInputError if isinstance(e, MergeInputError) else RuntimeError
            raise wrapper(
                f"export to {self.output_dir} failed ({type(e).__name__}: {e}); the trained state is "
                f"saved in {ckpt}: fix the cause, then export it without training again with "
                f"`adamerge fit --config <the same config> --ckpt_path {ckpt}`"
            ) from e
        self._drop(trainer, ckpt)

    @staticmethod
    def _drop(trainer, ckpt: Path) -> None:
        if trainer.is_global_zero:  # exported: the manifest holds the coefficients
            import shutil

            if ckpt.is_dir():  # a sharded (distributed) checkpoint is a directory
                shutil.rmtree(ckpt)
            else:
                ckpt.unlink(missing_ok=True)


@runtime_checkable
class ManifestEntries(Protocol):
    """A part of the run (a callback, the data module, the CLI's config saver) that hands entries to the export's
    manifest: SelectStep its ``selection``, LRSchedule its ``lr_schedule``, the data module the ``data`` it adapted
    on, the CLI the run's ``config``. The export gathers them (:func:`run_entries`); nothing is set on the module."""

    def manifest_entries(self) -> dict[str, Any]: ...


def run_entries(trainer) -> dict[str, Any]:
    """The manifest entries of every part of ``trainer``'s run that hands some over (:class:`ManifestEntries`)."""
    entries: dict[str, Any] = {}
    for part in (*trainer.callbacks, trainer.datamodule):
        if isinstance(part, ManifestEntries):
            entries.update(part.manifest_entries())
    return entries


def run_directory(trainer) -> Path | None:
    """This run's own directory (rank 0): the W&B run's folder (``<save_dir>/wandb/offline-run-<time>-<id>/``), a
    versioned logger's ``log_dir`` (CSV, TensorBoard: ``<save_dir>/<name>/version_<n>/``), else None.
    Its config and coefficient heatmap go there, so runs of one config never overwrite each other's."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            files = getattr(logger.experiment, "dir", None)  # <run>/files, where W&B keeps its own config.yaml
            if files:
                return Path(files).parent
        directory = getattr(logger, "log_dir", None)
        if directory:
            return Path(directory)
    return None


class CoefficientHeatmap(pl.Callback):
    """Log the coefficient matrix as an image every ``every_n_steps`` and at the end of training.

    Images go to any logger with ``log_image`` (W&B), and ``coefficients.png`` into the run's own directory
    (:func:`run_directory`).

    Args:
        every_n_steps: logging interval (0 = only at the end).
    """

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = every_n_steps

    def _log(self, trainer, pl_module) -> None:
        matrix = pl_module.coefficient_matrix()  # on every rank: a collective when the coefficients are sharded
        if trainer.is_global_zero:
            self._write(trainer, pl_module, matrix)

    def _write(self, trainer, pl_module, matrix) -> None:
        from PIL import Image

        png = heatmap_png(
            matrix.float().numpy(), pl_module.task_names, f"{pl_module.method} coefficients, step {trainer.global_step}"
        )
        image = Image.open(io.BytesIO(png))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("coefficients", [image], step=trainer.global_step)
        directory = run_directory(trainer)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "coefficients.png").write_bytes(png)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)


class BackboneMode(pl.Callback):
    """The backbone's mode while the merge trains (``adamerge fit --backbone_mode``). adamerge keeps it in ``eval``
    (dropout off: the gradient is that of the model that will be exported); ``train`` switches dropout on during
    training, as FusionBench's AdaMerging does, and back to eval at the end. BatchNorm layers are not switched either
    way (in train mode they would overwrite the running statistics that the base and the experts share): the
    merge's training forward normalises with its batch's statistics (``--batchnorm_statistics``, see
    :meth:`adamerge.methods.MergeModule.training_batchnorm`), and its running statistics are re-estimated before
    export (``export.bn_batches``).

    Args:
        mode: ``eval`` or ``train``.
    """

    def __init__(self, mode: str = "eval") -> None:
        if mode not in ("eval", "train"):
            raise MergeInputError(f"backbone_mode: unknown value {mode!r}; allowed: eval, train")
        self.mode = mode

    def on_train_start(self, trainer, pl_module) -> None:
        backbone = pl_module.merged.backbone
        backbone.train(self.mode == "train")
        for m in backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.merged.backbone.eval()


class SelectStep(pl.Callback):
    """Label-free choice of the step to export: every ``every_n_steps`` (and before the first step) the model as it
    would be exported is scored on the data module's held-back unlabeled rows (``data.holdout``); at the end of
    training the best-scoring trainable state is restored, so the export (and the manifest's ``selection`` entry,
    with the whole history) is that step's. No label is ever read: the data module drops label columns.

    Criteria (:meth:`adamerge.methods.MergeModule.selection_score`): ``agreement`` — how often the merge predicts
    what each task's own expert predicts, averaged over the tasks (robust to the collapse of entropy minimisation,
    which lowers the entropy while moving away from the experts); ``worst_agreement`` — the same for the task that
    agrees least (a step where one task drifts from its expert while the others gain is not chosen);
    ``objective`` — the method's own objective on the held-back rows. With the agreement criteria the manifest's
    ``selection.per_task`` holds every scored step's per-task agreement. Each score during training is logged as
    ``selection`` (the metric :class:`SelectionEarlyStopping` monitors; W&B draws it).

    Args:
        every_n_steps: scoring interval in optimizer steps.
        criterion: ``agreement``, ``worst_agreement`` or ``objective``.
    """

    METRIC = "selection"  # the logged name of each score

    def __init__(self, every_n_steps: int = 10, criterion: str = "agreement") -> None:
        if every_n_steps < 1:
            raise MergeInputError(f"every_n_steps must be >= 1, got {every_n_steps}")
        check_criterion(criterion, "SelectStep criterion")  # before training, not at its first score
        self.every_n_steps, self.criterion = every_n_steps, criterion
        self.history: list[tuple[int, float]] = []
        self.per_task: list[tuple[int, dict[str, float]]] = []  # agreement criteria: each scored step's per task
        self.best: tuple[int, float] | None = None
        self.best_state: dict | None = None
        self._batches = self._experts = None
        # the agreement criteria: the smallest change of the score one held-back row makes (set with the rows)
        self.row_step: float | None = None
        self.result: dict[str, Any] | None = None  # the manifest's ``selection`` entry, once training ended

    def _setup(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        batches = dm.holdout_batches() if isinstance(dm, UnlabeledDataModule) else []
        if not batches:
            raise MergeInputError("SelectStep needs held-back unlabeled rows: set data.holdout (e.g. 64)")
        self._batches = [{**b, "inputs": {k: v.to(pl_module.device) for k, v in b["inputs"].items()}} for b in batches]
        rows: dict[str, int] = {}
        for b in batches:
            for task, size in zip(b["tasks"], b["sizes"]):
                rows[task] = rows.get(task, 0) + size
        most = max(rows.values())
        self.row_step = {"agreement": 1 / (len(rows) * most), "worst_agreement": 1 / most}.get(self.criterion)
        if self.criterion != "objective" and not pl_module.experts_are_fine_tunes:
            log.warning(
                "SelectStep %s: the method reads no expert in training, so with prep %s its stores hold only "
                "the processed task vectors, and the experts scored against are base + those; use an "
                "objective that reads the experts (kl, pseudo_label, features) or criterion: objective",
                self.criterion,
                pl_module.prep,
            )
        # the experts are frozen: their predictions on the held-back rows are computed once
        self._experts = (
            [pl_module.expert_outputs(b)[0] for b in self._batches]
            if self.criterion in ("agreement", "worst_agreement")
            else None
        )

    def _score(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if self.history and self.history[-1][0] == step:
            return
        if self._batches is None:
            self._setup(trainer, pl_module)
        with eval_mode(pl_module):
            value, per_task = pl_module.selection_scores(self._batches, self.criterion, self._experts)
        self.history.append((step, value))
        if per_task:
            self.per_task.append((step, per_task))
        if self.best is None or value > self.best[1]:
            self.best = (step, value)
            keep = pl_module.trainable_state_keys()
            self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in keep}
        log.info("selection %s at step %d: %.4f (best: step %d)", self.criterion, step, value, self.best[0])

    def on_train_start(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._score(trainer, pl_module)
            if self.history[-1][0] == trainer.global_step:
                pl_module.log(self.METRIC, self.history[-1][1], on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module)
        pl_module.load_state_dict(self.best_state, strict=False)
        self.result = {
            "criterion": self.criterion,
            "every_n_steps": self.every_n_steps,
            "selected_step": self.best[0],
            "score": self.best[1],
            "final_step": int(trainer.global_step),
            "history": [list(h) for h in self.history],
            **({"per_task": [list(h) for h in self.per_task]} if self.per_task else {}),
        }
        log.info("selected step %d of %d by %s (%.4f)", self.best[0], trainer.global_step, self.criterion, self.best[1])

    def manifest_entries(self) -> dict[str, Any]:
        return {"selection": self.result} if self.result else {}

    def state_dict(self) -> dict:
        return {"history": self.history, "per_task": self.per_task, "best": self.best, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.per_task = [tuple(h) for h in state.get("per_task", [])]
        self.best, self.best_state = state["best"], state["best_state"]


class SelectionEarlyStopping(EarlyStopping):
    """Lightning's :class:`~pytorch_lightning.callbacks.EarlyStopping` on :class:`SelectStep`'s label-free criterion:
    training stops once the logged ``selection`` score has not improved for ``patience`` consecutive scorings
    (``patience × every_n_steps`` steps). It is checked each time SelectStep scores (the run has no validation
    loop), and SelectStep still restores and exports the best step seen, so stopping only saves the steps after the
    criterion's plateau. List it after the SelectStep in ``trainer.callbacks``. The manifest records
    ``early_stopping``: the settings, the rise that counted as an improvement and the step training stopped at
    (null: it ran to ``max_steps``).

    An agreement score moves in steps of one held-back row (1 / (tasks × rows per task)); a rise of ``noise_rows``
    rows or fewer is read as noise, not as an improvement, so a plateau that gains one row now and then still
    stops. The ``objective`` criterion has no such step: there only ``min_delta`` applies.

    Args:
        patience: scorings without improvement before training stops.
        noise_rows: a rise of at most this many held-back rows' agreement is not an improvement (0: any rise is).
        min_delta: a rise must also be larger than this to count as an improvement.
    """

    def __init__(self, patience: int = 10, noise_rows: int = 1, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise MergeInputError(f"SelectionEarlyStopping patience must be >= 1, got {patience}")
        if noise_rows < 0 or min_delta < 0:
            raise MergeInputError(
                f"SelectionEarlyStopping noise_rows and min_delta must be >= 0, got {noise_rows} and {min_delta}"
            )
        super().__init__(
            monitor=SelectStep.METRIC,
            mode="max",
            patience=patience,
            min_delta=min_delta,
            check_on_train_epoch_end=False,
        )
        self.noise_rows, self._min_delta = noise_rows, float(min_delta)
        self.stopped_step: int | None = None
        self._select: SelectStep | None = None
        self._checked_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        order = list(trainer.callbacks)
        selects = [c for c in order if isinstance(c, SelectStep)]
        if not selects or order.index(selects[0]) > order.index(self):
            raise MergeInputError(
                "SelectionEarlyStopping stops on SelectStep's criterion: list an adamerge.training.SelectStep "
                "before it in trainer.callbacks"
            )
        self._select = selects[0]

    def on_validation_end(self, trainer, pl_module) -> None:
        """Not here: checked when SelectStep scores."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        history = self._select.history if self._select is not None else []
        step = int(trainer.global_step)
        if history and history[-1][0] == step and self._checked_step != step:
            self._checked_step = step
            row_step = self._select.row_step
            if row_step is not None:  # half a row above the noise: k rows count iff k > noise_rows, whatever rounding
                self.min_delta = max(self._min_delta, (self.noise_rows + 0.5) * row_step)
            self._run_early_stopping_check(trainer)
            if trainer.should_stop and self.stopped_step is None:
                self.stopped_step = step
                log.info("early stopping at step %d: %s", step, SelectStep.METRIC)

    def manifest_entries(self) -> dict[str, Any]:
        return {
            "early_stopping": {
                "monitor": SelectStep.METRIC,
                "patience": self.patience,
                "noise_rows": self.noise_rows,
                "min_delta": abs(float(self.min_delta)),
                "stopped_step": self.stopped_step,
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stopped_step": self.stopped_step, "checked_step": self._checked_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.stopped_step = state_dict.pop("stopped_step", None)
        self._checked_step = state_dict.pop("checked_step", None)
        super().load_state_dict(state_dict)


class LRSchedule(pl.Callback):
    """The learning rate of every optimizer of the run as a function of the step, for any method (one optimizer or
    several, automatic or manual optimization): before optimizer step ``k`` (0-based, of ``K`` =
    ``trainer.max_steps``) each parameter group's rate is its configured rate times

    - ``constant``: 1 (what the references ran);
    - ``cosine``: ``f + (1 - f) · (1 + cos(π p)) / 2``, ``p = (k - w) / (K - w)``;
    - ``linear``: ``f + (1 - f) · (1 - p)``;

    after ``w`` = ``warmup_steps`` steps of linear warm-up (``(k + 1) / w``), with ``f`` = ``final_fraction``. The
    factor is a function of the step alone and the configured rate is kept in each parameter group (saved with the
    optimizer's state), so a resumed run continues the same schedule. The manifest records it (``lr_schedule``).

    Args:
        kind: ``constant``, ``cosine`` or ``linear``.
        warmup_steps: steps of linear warm-up from ``lr / w`` (0: none).
        final_fraction: the rate the decay ends at, as a fraction of the configured rate (0 … 1).
    """

    KINDS = ("constant", "cosine", "linear")
    _BASE = "adamerge_base_lr"  # the configured rate, kept in each parameter group

    def __init__(self, kind: str = "cosine", warmup_steps: int = 0, final_fraction: float = 0.0) -> None:
        if kind not in self.KINDS:
            raise MergeInputError(f"LRSchedule kind: unknown value {kind!r}; allowed: {', '.join(self.KINDS)}")
        if warmup_steps < 0:
            raise MergeInputError(f"LRSchedule warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= final_fraction <= 1.0:
            raise MergeInputError(f"LRSchedule final_fraction must be in [0, 1], got {final_fraction}")
        self.kind, self.warmup_steps, self.final_fraction = kind, warmup_steps, final_fraction
        self.record: dict[str, Any] | None = None  # the manifest's ``lr_schedule`` entry, once training started

    def factor(self, step: int, total: int) -> float:
        """The multiplier of the configured rate before optimizer step ``step`` of ``total``."""
        w, f = self.warmup_steps, self.final_fraction
        if step < w:
            return (step + 1) / w
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (step - w) / max(1, total - w))
        decay = (1 + math.cos(math.pi * p)) / 2 if self.kind == "cosine" else 1 - p
        return f + (1 - f) * decay

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.max_steps or trainer.max_steps < 1:
            raise MergeInputError(
                f"LRSchedule needs trainer.max_steps (the schedule's length), got {trainer.max_steps}"
            )
        if self.warmup_steps >= trainer.max_steps and self.kind != "constant":
            raise MergeInputError(
                f"LRSchedule warmup_steps ({self.warmup_steps}) leaves no step to decay over in "
                f"trainer.max_steps ({trainer.max_steps})"
            )
        self.record = {
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "final_fraction": self.final_fraction,
            "total_steps": int(trainer.max_steps),
        }

    def manifest_entries(self) -> dict[str, Any]:
        return {"lr_schedule": self.record} if self.record else {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        scale = self.factor(int(trainer.global_step), int(trainer.max_steps))
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault(self._BASE, group["lr"])
                group["lr"] = group[self._BASE] * scale


class StepProgress(pl.Callback):
    """A progress bar in optimizer steps of the whole run (``step 40/60``, loss, elapsed and remaining time) instead of
    Lightning's per-epoch bar (the data module's epochs are an artefact of sampling). Use with
    ``trainer.enable_progress_bar: false``."""

    def __init__(self, refresh_every: int = 1) -> None:
        self.refresh_every, self._bar = max(1, refresh_every), None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self._bar = tqdm(
                total=total, initial=int(trainer.global_step), unit="step", desc="adamerge fit", dynamic_ncols=True
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        step = int(trainer.global_step)
        if step % self.refresh_every == 0 or step == trainer.max_steps:
            self._bar.update(step - self._bar.n)
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
