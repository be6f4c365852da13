"""Config files checked before jsonargparse sees them, so that a mistake costs one line: a missing file, a config
given to the other subcommand, a key no class takes (with the closest accepted one)."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adamerge.cli.moved import check_moved
from adamerge.errors import MergeInputError

FIT_TOP = (
    "seed_everything",
    "model",
    "data",
    "trainer",
    "export",
    "heatmap",
    "backbone_mode",
    "ckpt_path",
    "weights_only",
    "config",
)
MERGE_TOP = ("seed_everything", "model", "data", "config")


def parameters(cls: type) -> list[str]:
    """The keyword arguments ``cls`` takes, following ``**kwargs`` up its bases as jsonargparse does."""
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def resolve(class_path: str, default_module: str) -> type | None:
    """The class a config names (a full path, or a short name of ``default_module``), None if it cannot be found
    (jsonargparse reports that)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module or default_module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def refuse_unknown(keys: Mapping[str, Any], accepted: list[str], where: str, owner: str) -> None:
    for key in keys:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else f"; accepted: {', '.join(accepted)}"
            raise MergeInputError(f"{where}: `{key}` is not a setting of {owner}{hint}")


def check_class(entry: Any, where: str, default_module: str) -> None:
    """A ``{class_path, init_args}`` entry: its init_args against the class's own arguments."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("class_path"), str):
        return
    cls = resolve(entry["class_path"], default_module)
    if cls is not None and isinstance(entry.get("init_args"), Mapping):
        refuse_unknown(entry["init_args"], parameters(cls), f"{where}.init_args", cls.__name__)


def check_config(config: Any, path: str, subcommand: str) -> None:
    """Refuse, in one line, a ``subcommand`` (``fit``/``merge``) config that the other subcommand takes, or one with
    a key no class of it takes."""
    import pytorch_lightning as pl

    from adamerge.training import CoefficientHeatmap, ExportOnFitEnd, UnlabeledDataModule

    if not isinstance(config, Mapping):
        return
    fit_only = sorted(k for k in ("trainer", "export", "heatmap") if k in config)
    if subcommand == "merge" and fit_only:
        raise MergeInputError(
            f"{path} is a config for `adamerge fit` (it has {', '.join(fit_only)}): run `adamerge fit --config {path}`"
        )
    if subcommand == "fit" and "output_dir" in config and "trainer" not in config:
        raise MergeInputError(
            f"{path} is a config for `adamerge merge` (output_dir at the top): run `adamerge merge --config {path}`"
        )
    export_keys = parameters(ExportOnFitEnd)
    top = FIT_TOP if subcommand == "fit" else (*MERGE_TOP, *export_keys)
    refuse_unknown(config, list(top), path, f"`adamerge {subcommand}` configs")
    check_class(config.get("model"), f"{path}: model", "adamerge.methods")
    data = config.get("data")
    if isinstance(data, Mapping):
        refuse_unknown(data, parameters(UnlabeledDataModule), f"{path}: data", "the data module")
        check_tasks(data.get("tasks"), f"{path}: data.tasks")
    for section, cls in (("export", ExportOnFitEnd), ("heatmap", CoefficientHeatmap)):
        if isinstance(config.get(section), Mapping):
            refuse_unknown(config[section], parameters(cls), f"{path}: {section}", section)
    trainer = config.get("trainer")
    if isinstance(trainer, Mapping):
        refuse_unknown(trainer, parameters(pl.Trainer), f"{path}: trainer", "the Lightning Trainer")
        for i, callback in enumerate(trainer.get("callbacks") or []):
            check_class(callback, f"{path}: trainer.callbacks[{i}]", "pytorch_lightning.callbacks")


def check_tasks(tasks: Any, where: str) -> None:
    from adamerge.io.datasets import TaskData

    for task, spec in (tasks or {}).items() if isinstance(tasks, Mapping) else ():
        if isinstance(spec, Mapping):
            refuse_unknown(spec, list(TaskData.__dataclass_fields__), f"{where}.{task}", "a task's data")


def check_config_files(subcommand: str, argv: list[str]) -> None:
    """Every ``--config FILE`` of ``argv``: it must exist, name no setting that moved (:mod:`adamerge.cli.moved`) and
    pass :func:`check_config`; a flag that moved is refused too."""
    import yaml

    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
            if not Path(path).is_file():
                raise MergeInputError(f"--config {path}: no such file")
            try:
                config = yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as e:
                raise MergeInputError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
            check_moved(config, path)  # a setting of an earlier release first: say where it lives now
            check_config(config, path, subcommand)
        elif arg.startswith("--batchnorm_statistics"):
            raise MergeInputError("--batchnorm_statistics moved to --model.batchnorm_statistics")
