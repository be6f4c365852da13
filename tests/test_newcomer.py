"""What a new user meets first: every bad input is one line and exit status 2 with nothing written, a shadowed
install is refused, and a failing export never loses the trained state."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from test_cli import fit_config
from test_reliability import _nan, save_variant

from adamerge.cli.app import lightning_main
from adamerge.cli.main import check_install, main
from adamerge.errors import MergeInputError

ROOT = Path(__file__).resolve().parents[1]


def _truncated(tmp_path, zoo):
    src = Path(zoo[1]["spam"])
    bad = tmp_path / "truncated"
    bad.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return str(bad)


def _zero_byte_csv(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_bytes(b"")
    return str(p)


# case → (change to the fit config, pattern of the one error line)
CASES = {
    "missing fine-tune path": (
        lambda cfg, tmp, zoo: cfg["model"]["init_args"]["models"].update(spam=str(tmp / "no" / "such" / "model")),
        r"fine-tune 'spam': .*no/such/model does not exist",
    ),
    "missing base path": (
        lambda cfg, tmp, zoo: cfg["model"]["init_args"].update(base="./nowhere/base"),
        r"base: \./nowhere/base does not exist",
    ),
    "NaN weights": (
        lambda cfg, tmp, zoo: cfg["model"]["init_args"]["models"].update(
            spam=save_variant(tmp / "nan", zoo[0], mutate=_nan)
        ),
        r"'spam'.*contains NaN",
    ),
    "truncated safetensors": (
        lambda cfg, tmp, zoo: cfg["model"]["init_args"]["models"].update(spam=_truncated(tmp, zoo)),
        r"fine-tune 'spam': cannot load model .*truncated.*SafetensorError",
    ),
    "0-byte csv": (
        lambda cfg, tmp, zoo: cfg["data"]["tasks"]["spam"].update(path=_zero_byte_csv(tmp)),
        r"task 'spam': data file .*empty\.csv is empty \(0 bytes\)",
    ),
    "negative max_steps": (lambda cfg, tmp, zoo: cfg["trainer"].update(max_steps=-5), r"max_steps"),
    "zero max_steps": (lambda cfg, tmp, zoo: cfg["trainer"].update(max_steps=0), r"max_steps is 0"),
    "gradient accumulation": (
        lambda cfg, tmp, zoo: cfg["trainer"].update(accumulate_grad_batches=2),
        r"trainer.accumulate_grad_batches must be 1 \(got 2\)",
    ),
    "unknown objective": (
        lambda cfg, tmp, zoo: cfg["model"]["init_args"].update(objective="entropyy"),
        r"objective: unknown value 'entropyy'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(zoo, task_data, tmp_path, caplog, case):
    change, pattern = CASES[case]
    cfg = copy.deepcopy(fit_config(zoo, task_data, tmp_path))  # the zoo fixture's dicts are shared
    cfg["trainer"]["logger"] = False
    change(cfg, tmp_path, zoo)
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    caplog.set_level(logging.ERROR)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(p)])
    assert e.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    import re

    assert re.search(pattern, errors[0]), errors[0]
    assert "Namespace(" not in errors[0] and "Traceback" not in errors[0]
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.trained.ckpt").exists()


def test_missing_path_from_the_shell_prints_one_line(zoo, task_data, tmp_path):
    """The real command in a fresh process: stderr ends with the one error line, no traceback."""
    cfg = copy.deepcopy(fit_config(zoo, task_data, tmp_path))
    cfg["trainer"]["logger"] = False
    cfg["model"]["init_args"]["models"]["spam"] = "/nonexistent/spam-model"
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "adamerge", "fit", "--config", str(p)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert (
        res.stderr.strip().splitlines()[-1]
        == "ERROR adamerge: fine-tune 'spam': /nonexistent/spam-model does not exist"
    )


def test_check_install_refuses_a_shadowing_namespace_package(tmp_path):
    check_install()  # the real package passes
    shadow = types.ModuleType("adamerge")
    shadow.__path__ = [str(tmp_path / "adamerge")]  # what `import adamerge` gives for a folder without __init__.py
    with pytest.raises(MergeInputError, match=r"finds .*adamerge, not the installed package"):
        check_install(shadow)


def test_failed_export_keeps_the_trained_state_and_exports_it_again(zoo, task_data, tmp_path, monkeypatch):
    from adamerge.methods import MergeModule

    cfg = fit_config(zoo, task_data, tmp_path)
    cfg["trainer"]["logger"] = False
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    real = MergeModule.export

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MergeModule, "export", full_disk)
    trained = {}

    with pytest.raises(RuntimeError, match=r"trained state is saved in .*merged\.trained\.ckpt") as e:
        cli = lightning_main(["--config", str(p)], run=False)
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            trained["coef"] = cli.model.merged.coefficients.weight.detach().clone()
    assert "--ckpt_path" in str(e.value)
    ckpt = tmp_path / "merged.trained.ckpt"
    state = torch.load(ckpt, weights_only=False)  # our own file, written above
    assert state["global_step"] == 6 and list(state["state_dict"]) == ["merged.coefficients.weight"]
    assert torch.equal(state["state_dict"]["merged.coefficients.weight"], trained["coef"])
    assert (trained["coef"] - 0.3).abs().max() > 1e-4 and not (tmp_path / "merged").exists()

    monkeypatch.setattr(MergeModule, "export", real)
    cli = lightning_main(["fit", "--config", str(p), "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 6  # nothing trained again
    import json

    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert torch.equal(torch.tensor(manifest["coefficients"]["values"]), trained["coef"])
    assert not ckpt.exists()  # exported: the manifest holds the coefficients


def _accuracy(model, tok, csv_path, max_length):
    """Independent reference: plain transformers on the labelled csv."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    enc = tok(list(df["text"]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor(df["label"].values)).float().mean())


def test_evaluate_scores_a_plain_fine_tune_and_the_base_with_heads(zoo, task_data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adamerge.evaluate import evaluate_checkpoint

    base, paths = zoo
    tok = AutoTokenizer.from_pretrained(base)
    tasks = {t: {"path": p} for t, p in task_data.items()}
    fine = evaluate_checkpoint(paths["spam"], {"spam": tasks["spam"]}, max_length=16)
    ft = AutoModelForSequenceClassification.from_pretrained(paths["spam"]).eval()
    assert abs(fine["spam"]["accuracy"] - _accuracy(ft, tok, task_data["spam"], 16)) < 1e-6
    pre = evaluate_checkpoint(base, tasks, max_length=16, heads=paths)
    for task in tasks:  # the base's encoder under each fine-tune's head
        model = AutoModelForSequenceClassification.from_pretrained(paths[task]).eval()
        model.bert.load_state_dict(AutoModelForSequenceClassification.from_pretrained(base).bert.state_dict())
        assert abs(pre[task]["accuracy"] - _accuracy(model, tok, task_data[task], 16)) < 1e-6, task


def test_evaluate_errors_and_defaults_from_the_manifest(zoo, task_data, tmp_path):
    from adamerge.evaluate import evaluate_checkpoint

    tasks = {t: {"path": p} for t, p in task_data.items()}
    with pytest.raises(MergeInputError, match=r"checkpoint: .*nowhere does not exist"):
        evaluate_checkpoint(str(tmp_path / "nowhere"), tasks)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeInputError, match=r"is not a model directory: config.json is missing"):
        evaluate_checkpoint(str(tmp_path / "empty"), tasks)
    cfg = copy.deepcopy(fit_config(zoo, task_data, tmp_path))
    cfg["trainer"]["logger"], cfg["trainer"]["max_steps"] = False, 2
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    lightning_main(["fit", "--config", str(p)])
    import json

    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert manifest["data"]["max_length"] == 16 and set(manifest["data"]["tasks"]) == set(task_data)
    default = evaluate_checkpoint(str(tmp_path / "merged"), tasks, write=True)
    written = json.loads((tmp_path / "merged" / "eval_results.json").read_text())
    assert written["max_length"] == 16 and written["scores"] == default
    assert default == evaluate_checkpoint(str(tmp_path / "merged"), tasks, max_length=16)


class FirstStep(pl.Callback):
    """Records the global step each fit starts from (class_path: test_newcomer.FirstStep)."""

    seen: list[int] = []

    def on_train_start(self, trainer, pl_module):
        FirstStep.seen.append(int(trainer.global_step))


def test_ckpt_path_last_finds_the_previous_runs_checkpoints(zoo, task_data, tmp_path):
    """The README recipe: ModelCheckpoint(every_n_train_steps, save_last) without a dirpath, a W&B logger (a new run
    id each time), then `--ckpt_path last` on the same config resumes where the previous run stopped."""
    FirstStep.seen.clear()
    cfg = copy.deepcopy(fit_config(zoo, task_data, tmp_path))
    cfg["trainer"].update(
        max_steps=4,
        callbacks=[
            {
                "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": 2, "save_last": True},
            },
            {"class_path": "test_newcomer.FirstStep"},
        ],
    )
    p = tmp_path / "fit.yaml"
    p.write_text(yaml.safe_dump(cfg))
    lightning_main(["fit", "--config", str(p)])
    assert (tmp_path / "merged.checkpoints" / "last.ckpt").is_file()
    cli = lightning_main(
        ["fit", "--config", str(p), "--trainer.max_steps", "6", "--export.overwrite", "true", "--ckpt_path", "last"]
    )
    assert FirstStep.seen == [0, 4] and cli.trainer.global_step == 6


@pytest.mark.parametrize(
    "command, message",
    [
        (
            ["fit", "--model.init_args.base", "models/bert-base-uncased"],
            "base: models/bert-base-uncased does not exist",
        ),
        (
            ["fit", "--model.init_args.base", "someone/no-such-model"],
            "base: someone/no-such-model is not a local path, and the Hub is off here (HF_HUB_OFFLINE)",
        ),
        (
            ["evaluate", "--checkpoint", "runs/mine", "--tasks", '{"a": {"path": "a.csv"}}'],
            "checkpoint: runs/mine is not a local path, and the Hub is off here",
        ),
    ],
)
def test_a_path_that_does_not_exist_is_refused_at_once(zoo, task_data, tmp_path, command, message):
    """A source that looks local (here ``models/…`` with ``models/`` present) and does not exist, or a Hub id while
    the Hub is off, is refused before anything loads: exit 2, one line naming the field and the path, no retries."""
    import time

    (tmp_path / "models").mkdir()
    cfg = fit_config(zoo, task_data, tmp_path)
    cfg["trainer"]["logger"] = False
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    args = [*command[:1], "--config", "fit.yaml", *command[1:]] if command[0] == "fit" else command
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "adamerge", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) <= 3 and message in lines[-1], res.stderr[-2000:]
    assert time.time() - t0 < 20


def test_a_fine_tune_saved_without_its_head_is_refused_by_name(zoo, tmp_path):
    """A fine-tune saved as a bare backbone (``BertModel``) would load with a random classifier: refused, naming
    the model and the tensors; the base's own missing classifier (no merge reads it) is not."""
    from transformers import BertModel

    from adamerge.pool import load_pool

    base, paths = zoo
    BertModel.from_pretrained(paths["spam"]).save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(
        MergeInputError,
        match=r"fine-tune 'spam': .*bare: .*initialise \['classifier.bias', 'classifier.weight'\] at random",
    ):
        load_pool(base, {**paths, "spam": str(tmp_path / "bare")})
    bare_base = tmp_path / "bare-base"
    BertModel.from_pretrained(base).save_pretrained(str(bare_base))
    load_pool(str(bare_base), paths)  # a base without a classifier: fine
