"""Bad inputs fail with errors that name the model/tensor/field; output is atomic; runs resume and repeat exactly."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from adamerge.errors import MergeInputError
from adamerge.pool import load_pool

ROOT = Path(__file__).resolve().parents[1]


def save_variant(path: Path, base_dir: str, mutate=None, config_changes=None, model_cls=None):
    """Save a copy of the base classifier with a changed config and/or mutated weights."""
    from transformers import BertForSequenceClassification

    cfg = tiny_config()
    for k, v in (config_changes or {}).items():
        setattr(cfg, k, v)
    if model_cls is None:
        model = BertForSequenceClassification(cfg)
        if not config_changes:
            model.load_state_dict(BertForSequenceClassification.from_pretrained(base_dir).state_dict())
    else:
        model = model_cls
    if mutate:
        mutate(model)
    model.save_pretrained(str(path))
    return str(path)


def roberta(path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=70,
        )
    )


def _nan(m):
    with torch.no_grad():
        m.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")


CASES = {
    "architecture differs": (dict(model_cls=roberta(None)), r"architectures differ"),
    "shape differs": (
        dict(config_changes={"intermediate_size": 48}),
        r"tensor 'encoder\.layer\.0\.intermediate\.dense\.weight' has shape",
    ),
    "missing keys (fewer layers)": (
        dict(config_changes={"num_hidden_layers": 1}),
        r"backbone keys differ from the base: missing \['encoder\.layer\.1",
    ),
    "vocab size differs": (dict(config_changes={"vocab_size": 80}), r"word_embeddings\.weight.*vocab size 80 vs base"),
    "NaN in a checkpoint": (
        dict(mutate=_nan),
        r"tensor 'encoder\.layer\.0\.attention\.self\.query\.weight' contains NaN",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_is_named_in_the_error(zoo, tmp_path, case):
    base, paths = zoo
    kwargs, pattern = CASES[case]
    bad = save_variant(tmp_path / "bad", base, **kwargs)
    with pytest.raises(MergeInputError, match=pattern) as e:
        load_pool(base, {"sentiment": paths["sentiment"], "broken": bad})
    assert "'broken'" in str(e.value) or bad in str(e.value)


def test_corrupt_safetensors_is_named(zoo, tmp_path):
    base, paths = zoo
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    with pytest.raises(MergeInputError, match="corrupt.safetensors"):
        load_pool(base, {"a": paths["sentiment"], "b": str(bad)})
    d = tmp_path / "corrupt_dir"
    save_variant(d, base)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MergeInputError, match="corrupt_dir"):
        load_pool(base, {"a": str(d)})


def test_safetensors_file_with_missing_key_is_named(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    base, paths = zoo
    sd = load_file(str(Path(paths["sentiment"]) / "model.safetensors"))
    sd.pop("bert.pooler.dense.bias")
    save_file(sd, str(tmp_path / "ft.safetensors"))
    with pytest.raises(MergeInputError, match=r"missing keys \['bert\.pooler\.dense\.bias'\]"):
        load_pool(base, {"a": str(tmp_path / "ft.safetensors")})


def test_safetensors_file_source_loads_like_a_directory(zoo, tmp_path):
    import shutil

    base, paths = zoo
    shutil.copy(Path(paths["topic"]) / "model.safetensors", tmp_path / "topic.safetensors")  # no config next to it
    a = load_pool(base, {"topic": paths["topic"]})
    b = load_pool(base, {"topic": str(tmp_path / "topic.safetensors")})
    assert b.heads["topic"].config.num_labels == 3
    assert all(torch.equal(a.task_vectors[n], b.task_vectors[n]) for n in a.task_vectors)


def test_finetune_identical_to_base_warns(zoo, caplog):
    base, paths = zoo
    with caplog.at_level(logging.WARNING, logger="adamerge.pool"):
        load_pool(base, {"same": base, "sentiment": paths["sentiment"]})
    assert any("'same'" in r.message and "task vector is zero" in r.message for r in caplog.records)


def test_data_errors_name_the_task_and_field(tmp_path, zoo):
    from adamerge.io.datasets import TaskData, load_texts

    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(MergeInputError, match=r"task 'spam': dataset .*empty.csv.* is empty"):
        load_texts(TaskData(str(empty)), "spam")
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\nhello,1\n")
    with pytest.raises(
        MergeInputError, match=r"task 'spam': text column 'text' not in .*columns: \['sentence', 'label'\]"
    ):
        load_texts(TaskData(str(p)), "spam")
    with pytest.raises(MergeInputError, match=r"unsupported file type '.tsv'.*or a folder of .txt files"):
        q = tmp_path / "d.tsv"
        q.write_text("x")
        load_texts(TaskData(str(q)), "spam")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(MergeInputError, match=r"task 'spam': .*blank.txt has no non-empty line of text"):
        load_texts(TaskData(str(blank)), "spam")


def test_plain_text_is_one_row_per_non_empty_line(tmp_path, zoo):
    """A ``.txt`` file, and a folder of them (every file, in name order, sub-folders too), read as one ``text`` row
    per non-empty line; the data module tokenizes exactly those lines; evaluate refuses text without labels by name."""
    from transformers import AutoTokenizer

    from adamerge.evaluate import LabeledTaskData, load_labeled
    from adamerge.io.datasets import TaskData, load_texts
    from adamerge.training.datamodule import UnlabeledDataModule

    base, _ = zoo
    one = tmp_path / "reviews.txt"
    one.write_text("good movie\n\n  bad plot  \r\nlove the actor\n")
    folder = tmp_path / "spam"
    (folder / "more").mkdir(parents=True)
    (folder / "b.txt").write_text("call now\n")
    (folder / "a.txt").write_text("win a prize\n\nfree call\n")
    (folder / "more" / "c.txt").write_text("hello friend\n")
    (folder / "notes.md").write_text("not read\n")
    assert load_texts(TaskData(str(one)), "reviews")["text"] == ["good movie", "bad plot", "love the actor"]
    assert load_texts(TaskData(str(folder)), "spam")["text"] == ["win a prize", "free call", "call now", "hello friend"]
    dm = UnlabeledDataModule(
        {"reviews": TaskData(str(one)), "spam": TaskData(str(folder))},
        tokenizer=base,
        samples_per_task=2,
        max_length=16,
    )
    dm.setup("fit")
    tok = AutoTokenizer.from_pretrained(base)
    encoded = {
        tuple(tok(line, truncation=True, max_length=16)["input_ids"])
        for line in ["good movie", "bad plot", "love the actor", "win a prize", "free call", "call now", "hello friend"]
    }
    batch = dm.first_steps(1)[0]
    rows = batch["inputs"]["input_ids"]
    mask = batch["inputs"]["attention_mask"].bool()
    assert {tuple(r[m].tolist()) for r, m in zip(rows, mask)} <= encoded
    with pytest.raises(MergeInputError, match=r"plain text without labels; evaluate needs labelled data"):
        load_labeled(LabeledTaskData(str(one)), "reviews", None)


def test_a_template_is_the_text_the_model_reads(tmp_path, zoo):
    """``template`` formats each row's columns into the model's input (the prompts a text-to-text fine-tune saw): the
    data module's rows are the tokenizer's own encoding of the formatted strings, written out here by hand; a missing
    column is named, a template that names no column (or not by name) is refused."""
    from transformers import AutoTokenizer

    from adamerge.io.datasets import TaskData, load_texts
    from adamerge.training.datamodule import UnlabeledDataModule

    base, _ = zoo
    path = tmp_path / "pairs.csv"
    path.write_text("premise,hypothesis,label\ngood movie,great plot,1\nfree prize,call now,0\n")
    spec = TaskData(str(path), template="Does '{premise}' imply '{hypothesis}'? yes or no")
    assert spec.input_columns == ["premise", "hypothesis"]
    dm = UnlabeledDataModule({"nli": spec}, tokenizer=base, samples_per_task=2, max_length=32)
    dm.setup()
    tok = AutoTokenizer.from_pretrained(base)
    for i, (p, h) in enumerate([("good movie", "great plot"), ("free prize", "call now")]):
        expected = tok(f"Does '{p}' imply '{h}'? yes or no", truncation=True, max_length=32)["input_ids"]
        assert dm.dataset.rows["nli"][i]["input_ids"] == expected
    other = tmp_path / "other.csv"
    other.write_text("text\nx\n")
    with pytest.raises(MergeInputError, match=r"task 'nli': text column 'premise' not in"):
        load_texts(TaskData(str(other), template="{premise}"), "nli")
    for bad, why in (("no column", "it reads none"), ("{0}", "not \\['0'\\]"), ("{row.text}", "not")):
        with pytest.raises(MergeInputError, match=why):
            TaskData(str(path), template=bad)


def test_samples_per_task_above_a_tasks_rows_warns_naming_it(tmp_path, zoo, caplog):
    """A task with fewer rows than samples_per_task: a warning names it, and each step still holds every row of it
    (repeated), never a row twice before all were used."""
    import logging

    from adamerge.io.datasets import TaskData
    from adamerge.training.datamodule import UnlabeledDataModule

    base, _ = zoo
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    small.write_text("text\n" + "".join(f"tiny row {i}\n" for i in range(3)))
    big.write_text("text\n" + "".join(f"row number {i}\n" for i in range(20)))
    dm = UnlabeledDataModule(
        {"small": TaskData(str(small)), "big": TaskData(str(big))}, tokenizer=base, samples_per_task=8, max_length=16
    )
    with caplog.at_level(logging.WARNING, logger="adamerge.training.datamodule"):
        dm.setup("fit")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("task 'small' has 3 rows, fewer than data.samples_per_task (8)" in m for m in msgs)
    assert not any("'big'" in m for m in msgs)
    picked = dm.dataset.indices(0, "small", 0)
    assert len(picked) == 8 and set(picked) == {0, 1, 2} and set(picked[:3]) == {0, 1, 2}  # all three before a repeat


def test_unknown_method_and_granularity(zoo):
    from adamerge.methods import AdaMerging, get_method

    with pytest.raises(MergeInputError, match=r"method: unknown value 'adamergin'; allowed: average, task_arithmetic"):
        get_method("adamergin")
    base, paths = zoo
    with pytest.raises(MergeInputError, match=r"granularity: unknown value 'block'; allowed: task, layer"):
        AdaMerging(base, paths, granularity="block")


def test_wrong_config_type_is_rejected_before_loading(tmp_path, capsys):
    from adamerge.cli.main import main

    cfg = {
        "model": {
            "class_path": "adamerge.methods.AdaMerging",
            "init_args": {"base": "b", "models": {"a": "x"}, "init": "not-a-number"},
        },
        "data": {"tasks": {"a": {"path": "a.csv"}}},
    }
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(p)])
    assert e.value.code == 2
    assert "init" in capsys.readouterr().err


def test_existing_output_dir_refused_and_interrupted_export_leaves_nothing(zoo, tmp_path, monkeypatch):
    from adamerge.checkpoint import writer as writer_mod
    from adamerge.methods import TaskArithmetic

    base, paths = zoo
    module = TaskArithmetic(base, paths)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(MergeInputError, match="already exists"):
        module.export(target)
    assert (target / "keep.txt").read_text() == "user data"

    calls = {"n": 0}
    real = writer_mod.save_file

    def dying_save(*a, **k):  # the files besides the root's weights: one per task model, then the heads
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interrupt mid-export")
        return real(*a, **k)

    monkeypatch.setattr(writer_mod, "save_file", dying_save)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        module.export(fresh)
    assert not fresh.exists()
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        module.export(target, overwrite=True)
    assert (target / "keep.txt").read_text() == "user data"  # the old directory is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    monkeypatch.setattr(writer_mod, "save_file", real)
    module.export(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "merge_manifest.json").is_file()


def test_no_pickle_loading_in_library():
    offenders = [
        p
        for p in (ROOT / "adamerge").rglob("*.py")
        if "torch.load(" in p.read_text() and "weights_only=True" not in p.read_text()
    ]
    assert not offenders
    text = "".join(p.read_text() for p in (ROOT / "adamerge").rglob("*.py"))
    assert "trust_remote_code=True" not in text


def _fit_cfg(zoo, task_data, tmp_path, name):
    base, paths = zoo
    ckpt_dir = tmp_path / f"{name}_ckpt"
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "adamerge.methods.AdaMerging",
            "init_args": {"base": base, "models": paths, "granularity": "layer", "lr": 0.01},
        },
        "data": {
            "tasks": {t: {"path": p} for t, p in task_data.items()},
            "samples_per_task": 4,
            "max_length": 16,
            "steps_per_epoch": 3,
        },
        "trainer": {
            "max_steps": 8,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "logger": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / name),
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(ckpt_dir),
                        "every_n_train_steps": 2,
                        "save_last": True,
                        "save_top_k": -1,
                    },
                }
            ],
        },
        "export": {"output_dir": str(tmp_path / f"{name}_out")},
    }, ckpt_dir


def _run(tmp_path, cfg, name, extra=()):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, "-m", "adamerge", "fit", "--config", str(p), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _coefficients(out_dir: Path) -> torch.Tensor:
    return torch.tensor(json.loads((out_dir / "merge_manifest.json").read_text())["coefficients"]["values"])


@pytest.fixture(scope="module")
def straight_run(zoo, task_data, tmp_path_factory):
    """The uninterrupted run the resumed ones must equal: 8 steps, epochs of 3 steps."""
    tmp_path = tmp_path_factory.mktemp("straight")
    cfg, _ = _fit_cfg(zoo, task_data, tmp_path, "straight")
    res = _run(tmp_path, cfg, "straight")
    assert res.returncode == 0, res.stderr[-3000:]
    return _coefficients(tmp_path / "straight_out")


@pytest.mark.parametrize("every,kill_at", [(2, 5), (3, 7)], ids=["mid-epoch", "epoch-boundary"])
def test_sigkill_and_resume_gives_the_same_coefficients(zoo, task_data, tmp_path, straight_run, every, kill_at):
    """SIGKILL after step ``kill_at``; resume from the last checkpoint (step 4: mid-epoch; step 6: the last batch of
    the second epoch, which Lightning restores as a mid-epoch restart of that epoch): bit-identical coefficients."""
    cfg, ckpt_dir = _fit_cfg(zoo, task_data, tmp_path, "killed")
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    killed = {
        **cfg,
        "trainer": {
            **cfg["trainer"],
            "callbacks": [
                *cfg["trainer"]["callbacks"],
                {"class_path": "kill_callback.KillAt", "init_args": {"step": kill_at}},
            ],
        },
    }
    res = _run(tmp_path, killed, "killed")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (tmp_path / "killed_out").exists()  # nothing half-written
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)  # our own file, written above
    assert ckpt["global_step"] == kill_at // every * every and list(ckpt["state_dict"]) == [
        "merged.coefficients.weight"
    ]
    res = _run(tmp_path, cfg, "resumed", extra=["--ckpt_path", str(ckpt_dir / "last.ckpt")])
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _coefficients(tmp_path / "killed_out")
    assert (straight_run - 0.3).abs().max() > 1e-3
    assert torch.equal(straight_run, resumed)


def test_step_sampler_follows_the_step_count_not_the_epoch():
    """Step ids are the trainer's step count onwards to the end of its epoch, whatever epoch Lightning reports."""
    from adamerge.training.datamodule import StepSampler

    for g, expected in [(0, [0, 1, 2]), (4, [4, 5]), (6, [6, 7, 8]), (8, [8])]:
        s = StepSampler(3, lambda g=g: g)
        s.set_epoch(7)  # ignored
        assert list(s) == expected and len(s) == 3


def test_same_seed_gives_identical_coefficients(zoo, task_data, tmp_path):
    from adamerge.cli.app import lightning_main

    results = []
    for i in range(2):
        cfg, _ = _fit_cfg(zoo, task_data, tmp_path, f"det{i}")
        cfg["trainer"]["callbacks"] = []
        cfg["trainer"]["max_steps"] = 4
        p = tmp_path / f"det{i}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        results.append(lightning_main(["fit", "--config", str(p)]).model.merged.coefficients.weight.detach())
    assert (results[0] - 0.3).abs().max() > 1e-4
    assert torch.equal(results[0], results[1])
