"""The LightningCLI behind ``adamerge fit`` (every ``Trainer`` flag works: ``--trainer.devices 4 --trainer.strategy
ddp``) and ``adamerge merge`` (data-free methods, the same export)::

    adamerge fit --config configs/guided.yaml        train the coefficients, export at the end
    adamerge merge --config configs/benchmark/ties.yaml   a data-free merge, the same export format
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from adamerge.methods import MergeModule
from adamerge.training.callbacks import BackboneMode, CoefficientHeatmap, ExportOnFitEnd, run_directory
from adamerge.training.datamodule import UnlabeledDataModule


def quiet_libraries() -> None:
    """No network unless asked, and no third-party noise that alarms without informing: Lightning's product tips,
    its warning about modules in eval mode (the backbone trains in eval mode on purpose: README "Resuming,
    determinism"), its logging-interval and dataloader-worker hints, a deprecation inside Lightning itself."""
    import warnings

    os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network unless the user asks
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for message in (
        r"Found \d+ module\(s\) in eval mode",
        r".*isinstance\(treespec, LeafSpec\)",
        r"The number of training batches .* is smaller than the logging interval",
        r"The '\w+_dataloader' does not have many workers",
    ):
        warnings.filterwarnings("ignore", message=message)

    class NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in record.getMessage()

    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(NoTips())
    try:
        import datasets

        datasets.disable_progress_bars()  # "Saving the dataset (1/1 shards)" for every split
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


class RunConfig(SaveConfigCallback):
    """Saves the run's config as ``config.yaml`` in the run's own directory (:func:`run_directory`: the W&B run's
    folder, a CSV/TensorBoard version folder) instead of the logger's shared ``save_dir``; without one, where
    Lightning puts it (``trainer.default_root_dir``)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            directory = run_directory(trainer) or Path(trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config,
                str(directory / self.config_filename),
                skip_none=False,
                overwrite=True,
                multifile=self.multifile,
            )
        self.already_saved = True

    def manifest_entries(self) -> dict:
        """The run's full config, for the export's manifest and model card (``training.ManifestEntries``)."""
        config = run_config_yaml(self.parser, self.config)
        return {"config": config} if config else {}


class AdaMergeCLI(LightningCLI):
    """LightningCLI with the data module's tokenizer linked to the model's base."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: a merge has no validation, test or prediction loop of Lightning's (``adamerge evaluate``
        scores an export)."""
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.base", "data.tokenizer")
        # always-on callbacks, configured as top-level sections `export:` and `heatmap:`
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.add_lightning_class_args(CoefficientHeatmap, "heatmap")
        parser.add_argument(
            "--backbone_mode",
            type=Literal["eval", "train"],
            default="eval",
            help="mode of the backbone while the merge trains: eval (dropout off, the gradient of the "
            "model that is exported; default) or train (dropout on, as FusionBench)",
        )

    def before_fit(self) -> None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        config = self.config[self.subcommand]
        if config.get("backbone_mode", "eval") != "eval":
            self.trainer.callbacks.append(BackboneMode(config["backbone_mode"]))
        target = checkpoint_dir(config["export"]["output_dir"])
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(target)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where ``ModelCheckpoint`` callbacks without a ``dirpath`` write: ``<export.output_dir>.checkpoints``, the same
    for every run of a config (Lightning's default is inside the logger's run directory, a new one per W&B run, so
    ``--ckpt_path last`` would never find the previous run's checkpoints)."""
    out = Path(output_dir)
    return out.with_name(out.name + ".checkpoints")


def trainer_defaults() -> dict:
    return {
        "max_steps": 500,
        "logger": {
            "class_path": "pytorch_lightning.loggers.WandbLogger",
            "init_args": {"offline": True, "project": "adamerge", "save_dir": "runs"},
        },
        "enable_checkpointing": True,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # the data module shards each step itself (see adamerge.training.datamodule)
        "log_every_n_steps": 10,
    }


def lightning_main(args: list[str] | None = None, run: bool = True) -> AdaMergeCLI:
    return AdaMergeCLI(
        MergeModule,
        UnlabeledDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        trainer_defaults=trainer_defaults(),
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        auto_configure_optimizers=False,
    )


class _ParseOnly(AdaMergeCLI):
    def instantiate_classes(self) -> None:  # validate the config, load nothing
        pass


def parse_only(config: str | os.PathLike, overrides: list[str] | tuple = ()):
    """Parse and type-check a config file (``fit`` or ``merge`` style), with command-line ``overrides`` after it,
    without loading any model."""
    import yaml

    doc = yaml.safe_load(open(config))
    if "output_dir" in doc and "trainer" not in doc:
        return merge_parser().parse_args(["--config", str(config), *overrides])
    return _ParseOnly(
        MergeModule,
        UnlabeledDataModule,
        subclass_mode_model=True,
        run=False,
        args=["--config", str(config), *overrides],
        trainer_defaults=trainer_defaults(),
        save_config_callback=None,
        auto_configure_optimizers=False,
    ).config


def merge_parser() -> LightningArgumentParser:
    from jsonargparse import ActionConfigFile

    parser = LightningArgumentParser(prog="adamerge merge", description="data-free merge, exported")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_lightning_class_args(MergeModule, "model", subclass_mode=True)
    parser.add_argument(
        "--data",
        type=dict | None,
        default=None,
        help="UnlabeledDataModule arguments (tasks, samples_per_task, ...): M3 candidate selection, "
        "BatchNorm re-estimation (bn_batches)",
    )
    # the export's arguments are ExportOnFitEnd's (`export.*` under `adamerge fit`), here as top-level keys
    parser.add_class_arguments(ExportOnFitEnd, nested_key=None, as_group=True)
    parser.set_defaults(output_dir=None)  # required here: a data-free merge has no run directory to default to
    parser.add_argument("--seed_everything", type=int, default=0)
    return parser


def merge_main(args: list[str] | None = None):
    """``adamerge merge``: a data-free method (or M3 with entropy-selected candidates), exported."""
    from adamerge.errors import MergeInputError

    parser = merge_parser()
    cfg = parser.parse_args(args)
    if cfg.output_dir is None:
        raise MergeInputError("output_dir: required (where the merged checkpoint is written)")
    if os.path.exists(cfg.output_dir) and not cfg.overwrite:
        raise MergeInputError(f"output_dir {cfg.output_dir} already exists; pass --overwrite true to replace it")
    model = parser.instantiate_classes(cfg).model
    if model.trainable:
        raise MergeInputError(f"method {model.method!r} trains; run it with `adamerge fit`")
    dm = None
    if cfg.data and cfg.data.get("tasks"):
        dm = UnlabeledDataModule(**{"tokenizer": model.base_source, **cfg.data})
    if model.needs_data:
        if dm is None:
            raise MergeInputError(f"method {model.method!r} with candidates > 1 needs `data.tasks`")
        model.use_data(dm)
    exporter = ExportOnFitEnd(**{k: cfg[k] for k in export_keys()})
    exporter.recalibrate(model, dm)
    config = run_config_yaml(parser, cfg)
    return exporter.export(model, entries={"config": config} if config else None)


def export_keys() -> list[str]:
    import inspect

    return [k for k in inspect.signature(ExportOnFitEnd.__init__).parameters if k != "self"]


def run_config_yaml(parser, cfg) -> str | None:
    """The run's full config as YAML (for the manifest and the model card), or None if it cannot be dumped."""
    try:
        return parser.dump(cfg, skip_none=False)
    except Exception as e:  # a value jsonargparse cannot serialise must not stop the run
        logging.getLogger(__name__).warning("the run's config is not recorded in the export: %s", e)
        return None
