"""Every shipped config runs as a user runs it, through the `adamerge` command.

The configs name hub ids (CLIP ViT-B/32, Llama-2) or the benchmark's caches, which this machine cannot reach or does
not hold; each config is run here as written except that its model, data and head-dataset paths point to tiny random
models and data of the same kind, saved locally under the config's own task names, and its trainer is cut to 2 steps
on one CPU process (the FSDP2 config's strategy included: `test_distributed.py` covers FSDP2). Everything else --
method, objective, granularity, prep, Concrete and Surgery settings, callbacks, export options -- is the file's. A
field the code no longer reads, a default that changed its type, a method that fails past its first step or at
export: any of these fails here, where `test_cli.py::test_every_config_parses` only type-checks the file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from adamerge.cli.main import main
from tests.conftest import build_clip_zoo, build_zoo, save_lm_zoo, text_rows, tiny_llama, tiny_t5

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SPLITS = ("train", "test", "unlabeled")
STEPS = 2


def _kind(cfg: dict) -> str:
    args = cfg["model"]["init_args"]
    if args.get("task_type"):
        return args["task_type"]
    return "lora" if (cfg.get("export") or {}).get("lora_adapters") else "seq_cls"


def _text_data(path: Path, spec: dict, rows: int, seed: int) -> str:
    """A ``DatasetDict`` (every split a config may name) with the text columns ``spec`` reads, and a label."""
    import datasets

    from adamerge.io.datasets import template_fields

    columns = (
        set(template_fields(spec["template"]))
        if spec.get("template")
        else {spec.get("text_column", "text"), *([spec["text_pair_column"]] if spec.get("text_pair_column") else [])}
    )
    table = {c: text_rows(rows, seed=seed + i) for i, c in enumerate(sorted(columns))}
    table["label"] = [i % 2 for i in range(rows)]
    datasets.DatasetDict({s: datasets.Dataset.from_dict(table) for s in SPLITS}).save_to_disk(str(path))
    return str(path)


def _lora_zoo(root: Path, tasks: list[str]):
    from tests.test_lora import make_adapter

    base, _ = build_zoo(root / "full", tasks={tasks[0]: 2})
    return base, {t: make_adapter(base, root / "lora" / t, 2, seed=i) for i, t in enumerate(tasks)}


def localise(cfg: dict, root: Path) -> tuple[dict, dict]:
    """The config with its models, data and head datasets swapped for tiny local ones under ``root`` (task names,
    columns and splits kept) and the run cut to :data:`STEPS` steps on one CPU process; and what was built."""
    cfg = copy.deepcopy(cfg)
    args = cfg["model"]["init_args"]
    tasks = list(args["models"])
    kind = _kind(cfg)
    if kind == "clip":
        zoo = build_clip_zoo(
            root / "zoo", {t: [f"{t}{j}" for j in range(2 + i % 3)] for i, t in enumerate(tasks)}, splits=SPLITS
        )
        base, models, images = zoo["base"], zoo["models"], zoo["data"]
        for t, head in (args.get("heads") or {}).items():
            if isinstance(head, dict) and "dataset" in head:
                head["dataset"]["path"] = images[t]
    elif kind == "causal_lm":
        base, models = save_lm_zoo(root / "zoo", lambda: tiny_llama(tied=False), tasks)
        images = {}
    elif kind == "seq2seq_lm":
        base, models = save_lm_zoo(root / "zoo", tiny_t5, tasks)
        images = {}
    elif kind == "lora":
        base, models = _lora_zoo(root / "zoo", tasks)
        images = {}
    else:
        base, models = build_zoo(root / "zoo", tasks={t: 2 for t in tasks})
        images = {}
    args["base"], args["models"] = base, models
    data = cfg.get("data") or {}
    for i, (t, spec) in enumerate((data.get("tasks") or {}).items()):
        spec["path"] = images[t] if spec.get("image_column") else _text_data(root / "data" / t, spec, 96, seed=i)
    if "trainer" in cfg:
        cfg["trainer"].update(
            max_steps=STEPS, accelerator="cpu", devices=1, strategy="auto", logger=False, enable_progress_bar=False
        )
        cfg["trainer"]["callbacks"] = [
            c for c in cfg["trainer"].get("callbacks") or [] if "ProgressBar" not in c["class_path"]
        ]
        cfg["export"] = {**(cfg.get("export") or {}), "output_dir": str(root / "out")}
    else:
        cfg["output_dir"] = str(root / "out")
    return cfg, {"base": base, "models": models, "kind": kind}


def _prerequisite(cfg: dict, root: Path) -> None:
    """Surgery adapts on top of an earlier export: make one (Task Arithmetic over the same tiny zoo) first."""
    args = cfg["model"]["init_args"]
    if "merged" not in args:
        return
    merge = {
        "model": {
            "class_path": "adamerge.methods.TaskArithmetic",
            "init_args": {k: args[k] for k in ("base", "models", "task_type", "heads") if k in args},
        },
        "output_dir": str(root / "first"),
    }
    (root / "first.yaml").write_text(yaml.safe_dump(merge, sort_keys=False))
    main(["merge", "--config", str(root / "first.yaml")])
    args["merged"] = str(root / "first")


def _predict_inputs(served, kind: str, base: str):
    if kind == "clip":
        from transformers import AutoImageProcessor

        from tests.conftest import image_rows

        proc = AutoImageProcessor.from_pretrained(base)
        return {
            "pixel_values": proc(images=[im.convert("RGB") for im in image_rows(3, 7)], return_tensors="pt")[
                "pixel_values"
            ]
        }
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(base)(
        ["good movie great plot", "free prize call now", "who is the actor"], padding=True, return_tensors="pt"
    )
    return dict(enc)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_runs_as_written_on_tiny_models(path, tmp_path, monkeypatch):
    from adamerge import load_merged
    from adamerge.cli.app import lightning_main

    monkeypatch.chdir(tmp_path)  # relative paths a config may still hold (and `config.yaml` of logger-less fits)
    written = yaml.safe_load(path.read_text())
    cfg, built = localise(written, tmp_path)
    _prerequisite(cfg, tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    fits = "trainer" in cfg
    if fits:
        cli = lightning_main(["fit", "--config", str(tmp_path / "run.yaml")])
        assert cli.trainer.global_step == STEPS
    else:
        main(["merge", "--config", str(tmp_path / "run.yaml")])
    out = tmp_path / "out"
    manifest = json.loads((out / "merge_manifest.json").read_text())

    # the method and every source the config names, in its order
    method = cfg["model"]["class_path"].rsplit(".", 1)[1]
    assert manifest["method"].replace("_", "") == method.lower(), (manifest["method"], method)
    assert [s["task"] for s in manifest["sources"]] == list(written["model"]["init_args"]["models"])
    # the config's own settings are the ones recorded (the run's config, the method's hparams)
    recorded = yaml.safe_load(manifest["config"])
    settings = {**manifest.get("hparams", {}), **manifest.get("surgery", {})}
    for key, value in written["model"]["init_args"].items():
        if key in ("base", "models", "heads", "merged"):
            continue
        if isinstance(value, dict):  # recorded with the defaults of the fields the config leaves out
            assert recorded["model"]["init_args"][key] == {**recorded["model"]["init_args"][key], **value}, key
        else:
            assert recorded["model"]["init_args"][key] == value, key
        if key in settings and value != "auto":  # `auto`: recorded as what it resolved to
            if key == "objective":  # recorded whole: a name alone is that objective with its default options
                value = {"name": value} if isinstance(value, str) else value
                assert settings[key] == {**settings[key], **value}, key
            else:
                assert settings[key] == value, key
        if key == "mask_temperature":  # Concrete's own temperature
            assert manifest["mask"]["temperature"] == value
    if "merged" in written["model"]["init_args"]:  # Surgery: the export it adapted on top of
        assert manifest["base_merge"]["method"] == "task_arithmetic"
    # the export options the config sets
    export = (written.get("export") or {}) if fits else written
    assert manifest["per_task_models"] == export.get("per_task_models", manifest["per_task_models"])
    assert (out / "tasks").is_dir() == bool(manifest["per_task_models"])
    if export.get("dtype"):
        assert manifest["weights"]["dtype"] == export["dtype"]
    if export.get("lora_adapters"):
        assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(built["models"])
    for callback in (cfg.get("trainer") or {}).get("callbacks") or []:
        if callback["class_path"].endswith("SelectStep"):
            assert manifest["selection"]["criterion"] == callback["init_args"]["criterion"]
            assert manifest["selection"]["selected_step"] in [h[0] for h in manifest["selection"]["history"]]

    # the export serves every task with its own head: one row of class scores per input
    served = load_merged(out)
    inputs = _predict_inputs(served, built["kind"], built["base"])
    for task in built["models"]:
        with torch.no_grad():
            logits = served.predict(task, **inputs)
        rows = next(iter(inputs.values())).shape[0]
        assert logits.shape[0] == rows and torch.isfinite(logits.float()).all(), task
