"""Lightning callbacks: export on fit end, coefficient heatmaps."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class ExportOnFitEnd(pl.Callback):
    """Write the flattened merged checkpoint when training ends (global rank 0 only).

    Args:
        output_dir: target directory (must not exist unless ``overwrite``).
        overwrite: replace an existing ``output_dir``.
        per_task_models: also write ``tasks/<task>/``, a complete sequence-classification checkpoint per task.
        lora_adapters: for merges of LoRA adapters, also write ``adapters/<task>/`` PEFT adapters.
    """

    def __init__(self, output_dir: str = "runs/merged", overwrite: bool = False, per_task_models: bool = True,
                 lora_adapters: bool = False) -> None:
        self.output_dir, self.overwrite, self.per_task_models = output_dir, overwrite, per_task_models
        self.lora_adapters = lora_adapters

    def on_fit_start(self, trainer, pl_module) -> None:
        # fail before hours of training, not after (on every rank, so none waits for a rank that stopped)
        if Path(self.output_dir).exists() and not self.overwrite:
            from adamerge.errors import MergeInputError

            raise MergeInputError(f"output_dir {self.output_dir} already exists; set overwrite: true to replace it")

    def on_fit_end(self, trainer, pl_module) -> None:
        # every rank gathers (collective when FSDP2 shards the model); global rank 0 writes
        pl_module.export(self.output_dir, overwrite=self.overwrite, per_task_models=self.per_task_models,
                         lora_adapters=self.lora_adapters, write=trainer.is_global_zero)


def heatmap_png(matrix, row_labels, title: str = "merge coefficients") -> bytes:
    """Render a ``[T, P]`` coefficient matrix as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, matrix.shape[1] * 0.08), 1 + 0.4 * matrix.shape[0]))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("parameter tensor")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


class CoefficientHeatmap(pl.Callback):
    """Log the coefficient matrix as an image every ``every_n_steps`` and at the end of training.

    Images go to any logger with ``log_image`` (W&B), and ``coefficients.png`` into the logger's directory.

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

        png = heatmap_png(matrix.float().numpy(), pl_module.task_names,
                          f"{pl_module.method} coefficients, step {trainer.global_step}")
        image = Image.open(io.BytesIO(png))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("coefficients", [image], step=trainer.global_step)
            directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
                (Path(directory) / "coefficients.png").write_bytes(png)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module)
