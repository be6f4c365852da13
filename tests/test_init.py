"""``adamerge init`` (adamerge.cli.init) and the command line's own help and one-line answers (adamerge.cli.guide,
adamerge.cli.keys): what a newcomer meets first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import text_rows

from adamerge.cli.init import init
from adamerge.errors import MergeInputError


def adamerge(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamerge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


@pytest.fixture
def text_files(tmp_path, zoo):
    out = {}
    for i, task in enumerate(zoo[1]):
        p = tmp_path / f"{task}.txt"
        p.write_text("\n".join(text_rows(40, seed=i)) + "\n")
        out[task] = str(p)
    return out


def test_init_writes_the_guided_recipe_that_fit_runs_as_written(zoo, text_files, tmp_path):
    """Own-head fine-tunes and .txt data: the printed config trains layer-wise coefficients with KL to the experts
    and tuned heads (never entropy), chooses its step without labels, and exports a stock-loadable merge."""
    base, paths = zoo
    res = adamerge("init", "--base", base, "--models", *(f"{t}={p}" for t, p in paths.items()), "--data",
                   *(f"{t}={p}" for t, p in text_files.items()), "--output_dir", str(tmp_path / "merged"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    config = yaml.safe_load(res.stdout)
    args = config["model"]["init_args"]
    assert config["model"]["class_path"] == "adamerge.methods.AdaMerging"
    assert args["objective"] == {"name": "kl", "temperature": 2.0} and args["tune_heads"] is True
    assert args["prep"] == {"subspace": "tsv"} and args["heads"] == {"pooler": True}  # BERT: the pooler is the head's
    assert args["models"] == paths and config["data"]["tasks"] == {t: {"path": p} for t, p in text_files.items()}
    callbacks = {cb["class_path"].rsplit(".", 1)[1]: cb for cb in config["trainer"]["callbacks"]}
    assert list(callbacks) == ["StepProgress", "SelectStep", "SelectionEarlyStopping"]  # the stopper after SelectStep
    assert callbacks["SelectionEarlyStopping"]["init_args"] == {"patience": 10, "noise_rows": 1}
    assert config["trainer"]["logger"]["init_args"]["offline"] is True
    assert res.stdout.startswith("# adamerge fit --config")  # commented: a user edits it
    # run as written, shortened
    config["trainer"].update(max_steps=4, accelerator="cpu")
    callbacks["SelectStep"]["init_args"]["every_n_steps"] = 2
    callbacks["SelectionEarlyStopping"]["init_args"]["patience"] = 1
    config["data"].update(samples_per_task=4, holdout=8, max_length=16)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    fit = adamerge("fit", "--config", "merge.yaml", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert manifest["hparams"]["objective"]["name"] == "kl" and manifest["hparams"]["tune_heads"] is True
    assert manifest["selection"]["criterion"] == "agreement" and manifest["data"]["tasks"]["spam"]["path"].endswith(
        "spam.txt"
    )
    assert manifest["early_stopping"]["patience"] == 1 and manifest["early_stopping"]["stopped_step"] in (None, 4)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged" / "tasks" / "spam"))


def test_init_with_a_data_free_method_writes_a_merge_config(zoo, text_files, tmp_path):
    base, paths = zoo
    text = init(base, paths, text_files, str(tmp_path / "ties"), method="ties")
    config = yaml.safe_load(text)
    assert text.startswith("# adamerge merge --config") and config["model"]["class_path"] == "adamerge.methods.Ties"
    assert config["output_dir"] == str(tmp_path / "ties") and "trainer" not in config
    (tmp_path / "ties.yaml").write_text(text)
    res = adamerge("merge", "--config", "ties.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "ties" / "merge_manifest.json").read_text())["method"] == "ties"


def test_init_refuses_what_fit_would_refuse_naming_it(zoo, text_files, tmp_path):
    from transformers import BertModel

    base, paths = zoo
    with pytest.raises(MergeInputError, match=r"--data: give unlabeled data for each task .*missing \['topic'\]"):
        init(base, paths, {t: p for t, p in text_files.items() if t != "topic"})
    with pytest.raises(MergeInputError, match=r"--data spam: .*nowhere.txt does not exist"):
        init(base, paths, {**text_files, "spam": str(tmp_path / "nowhere.txt")})
    BertModel.from_pretrained(paths["spam"]).save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(MergeInputError, match=r"--models spam: .*bare is a BertModel"):
        init(base, {**paths, "spam": str(tmp_path / "bare")}, text_files)
    res = adamerge("init", "--base", base, "--models", "spam", "--data", "spam=x.txt")
    assert res.returncode == 2 and "--models 'spam': expected TASK=PATH" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1


def test_the_command_line_lists_its_commands_and_answers_mistakes_in_a_line(zoo, task_data, tmp_path):
    from test_cli import fit_config

    top = adamerge("--help")
    assert top.returncode == 0
    for command in ("init", "fit", "merge", "evaluate", "sweep", "pick"):
        assert f"\n  {command} " in top.stdout
    assert "validate" not in top.stdout and "predict" not in top.stdout
    typo = adamerge("merg")
    assert typo.returncode == 2 and "did you mean `adamerge merge`?" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1

    cfg = fit_config(zoo, task_data, tmp_path)
    cfg["model"]["init_args"]["granularty"] = cfg["model"]["init_args"].pop("granularity")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(cfg))
    key = adamerge("fit", "--config", "typo.yaml", cwd=tmp_path)
    assert key.returncode == 2 and len(key.stderr.strip().splitlines()) <= 5
    assert "`granularty` is not a setting of AdaMerging; did you mean `granularity`?" in key.stderr
    cfg["model"]["init_args"]["granularity"] = cfg["model"]["init_args"].pop("granularty")
    cfg["data"]["sampels_per_task"] = 4
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(cfg))
    assert "did you mean `samples_per_task`?" in adamerge("fit", "--config", "typo.yaml", cwd=tmp_path).stderr

    missing = adamerge("fit", "--config", "nothere.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) <= 3
    assert "--config nothere.yaml: no such file" in missing.stderr
    del cfg["data"]["sampels_per_task"]
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    wrong = adamerge("merge", "--config", "fit.yaml", cwd=tmp_path)
    assert wrong.returncode == 2 and "fit.yaml is a config for `adamerge fit`" in wrong.stderr
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({"model": cfg["model"], "output_dir": "out"}))
    wrong = adamerge("fit", "--config", "merge.yaml", cwd=tmp_path)
    assert wrong.returncode == 2 and "merge.yaml is a config for `adamerge merge`" in wrong.stderr


def test_fit_help_shows_the_merge_settings_first_and_short():
    res = adamerge("fit", "--help")
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) < 120
    for flag in ("--model.base", "--model.models", "--model.heads", "--data.holdout", "--export.output_dir"):
        assert sum(line.lstrip().startswith(flag + " ") for line in lines) == 1, flag
    assert "pooler" in res.stdout.split("--model.heads", 1)[1].split("--model.", 1)[0]  # documented on its own line
    assert "--trainer.accelerator" not in res.stdout and "adamerge fit --help-all" in res.stdout
    assert "entropy" in res.stdout and "adamerge init" in res.stdout  # what an unset objective means, in one place
    every = adamerge("fit", "--help-all")
    assert every.returncode == 0 and "--trainer.accelerator" in every.stdout


def test_evaluate_takes_task_path_pairs_as_init_does(zoo, task_data, tmp_path):
    """``adamerge evaluate --tasks a=PATH b=PATH``: the same scores as the JSON mapping."""
    from adamerge.cli.main import task_pairs

    args = ["--checkpoint", "x", "--tasks", "spam=a.csv", "topic=b.csv", "--batch_size", "8"]
    assert task_pairs(args) == ["--checkpoint", "x", "--tasks", json.dumps({"spam": {"path": "a.csv"},
                                "topic": {"path": "b.csv"}}), "--batch_size", "8"]  # fmt: skip
    assert task_pairs(["--tasks", '{"spam": {"path": "a.csv"}}']) == ["--tasks", '{"spam": {"path": "a.csv"}}']
    base, paths = zoo
    pairs = adamerge("evaluate", "--checkpoint", paths["spam"], "--tasks", f"spam={task_data['spam']}")
    mapping = adamerge("evaluate", "--checkpoint", paths["spam"], "--tasks",
                       json.dumps({"spam": {"path": task_data["spam"]}}))  # fmt: skip
    assert pairs.returncode == 0, pairs.stderr[-2000:]
    assert json.loads(pairs.stdout) == json.loads(mapping.stdout) and "spam" in json.loads(pairs.stdout)
