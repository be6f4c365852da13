"""Expert-guided training: objectives inside the methods, tuned heads and their export, label-free step selection,
Concrete's export masks and the frozen-head zoo builder."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from adamerge.errors import MergeInputError
from adamerge.io.datasets import TaskData
from adamerge.methods import AdaMerging, ConcreteTaskArithmetic, TaskArithmetic
from adamerge.training.datamodule import UnlabeledDataModule


@pytest.fixture(scope="module")
def batch(zoo):
    from conftest import mixed_batch

    return mixed_batch(zoo[0])


def datamodule(zoo, task_data, holdout=0):
    return UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()},
        tokenizer=zoo[0],
        samples_per_task=4,
        max_length=16,
        holdout=holdout,
    )


@pytest.mark.parametrize("objective", ["infomax", "pseudo_label", "features"])
def test_task_chunks_give_the_same_gradient_for_every_objective(zoo, batch, objective):
    grads = []
    for chunks in (1, 3):
        module = AdaMerging(
            *zoo, granularity="layer", objective={"name": objective, "diversity_weight": 0.5}, task_chunks=chunks
        )
        torch.manual_seed(0)
        module.merged.coefficients.weight.data += 0.1 * torch.randn_like(module.merged.coefficients.weight)
        loss = (
            module.objective(batch)[0]
            if chunks == 1
            else module.merged.chunked_surrogate(batch, module.loss_with, chunks)[0]
        )
        loss.backward()
        grads.append(module.merged.coefficients.weight.grad.clone())
    assert grads[0].abs().max() > 1e-7
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_expert_guided_objectives_vanish_at_an_expert(zoo, batch):
    """With one task and coefficients one-hot on it, the merge *is* that task's expert: KL and feature alignment are
    exactly 0 and pseudo-labels reduce to the expert's own cross-entropy on its argmax."""
    base, paths = zoo
    one = {"topic": paths["topic"]}
    rows = {"inputs": {k: v[2:4] for k, v in batch["inputs"].items()}, "tasks": ["topic"], "sizes": [2]}
    for objective in ("kl", "features"):
        module = AdaMerging(base, one, granularity="task", init=1.0, objective=objective)
        with torch.no_grad():
            loss, _ = module.objective(rows)
        assert abs(float(loss)) < 1e-6, objective
    module = AdaMerging(base, one, granularity="task", init=1.0, objective="pseudo_label")
    with torch.no_grad():
        logits = module.merged(rows["inputs"], ["topic"], [2])["topic"]
        want = torch.nn.functional.cross_entropy(logits, logits.argmax(-1))
        assert abs(float(module.objective(rows)[0]) - float(want)) < 1e-6


def test_tuned_heads_train_export_and_load_in_stock_transformers(zoo, task_data, batch, tmp_path):
    from conftest import quick_fit
    from transformers import AutoModelForSequenceClassification

    module = AdaMerging(*zoo, granularity="layer", objective="kl", tune_heads=True, lr=0.05)
    before = {t: h.classifier.weight.detach().clone() for t, h in module.merged.heads.items()}
    trainable = module.trainable_state_keys()
    assert any(k.startswith("merged.heads.") for k in trainable) and "merged.coefficients.weight" in trainable
    assert not any(k.startswith("expert_heads.") for k in trainable)
    quick_fit(module, datamodule(zoo, task_data), 3)
    for t, h in module.merged.heads.items():
        assert (h.classifier.weight - before[t]).abs().max() > 1e-4  # tuned
        assert torch.equal(module.expert_heads[t].classifier.weight, before[t])  # the teachers kept theirs
    out = module.export(tmp_path / "merged")
    assert json.loads((out / "merge_manifest.json").read_text())["hparams"]["tune_heads"] is True
    sizes = batch["sizes"]
    for i, task in enumerate(batch["tasks"]):
        rows = {k: v[2 * i : 2 * i + sizes[i]] for k, v in batch["inputs"].items()}
        m = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / task)).eval()
        with torch.no_grad():
            got, want = m(**rows).logits, module.predict(task, rows)
        assert (got - want).abs().max() < 1e-5


def test_tune_heads_refuses_task_chunks(zoo):
    with pytest.raises(MergeInputError, match="task_chunks"):
        AdaMerging(*zoo, tune_heads=True, task_chunks=2)


def _labelled_copy(task_data, tmp_path, seed):
    """The same texts as ``task_data`` with the label column shuffled by ``seed``."""
    import random

    out = {}
    for task, path in task_data.items():
        with open(path) as f:
            rows = list(csv.DictReader(f))
        labels = [r["label"] for r in rows]
        random.Random(seed).shuffle(labels)
        p = tmp_path / f"{task}-{seed}.csv"
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([r["text"], y] for r, y in zip(rows, labels))
        out[task] = str(p)
    return out


def _fit_selected(zoo, data, criterion="agreement", steps=6, early=None, lr=0.2, noise_rows=0):
    import pytorch_lightning as pl

    from adamerge.training.callbacks import SelectionEarlyStopping, SelectStep

    class Record(pl.Callback):
        def __init__(self):
            self.coefficients = {0: None}

            self.backbone_training = []

        def on_train_start(self, trainer, module):
            self.coefficients[0] = module.merged.coefficients.weight.detach().clone()

        def on_train_batch_start(self, trainer, module, *args):
            self.backbone_training.append(any(m.training for m in module.merged.backbone.modules()))

        def on_train_batch_end(self, trainer, module, *args):
            self.coefficients[trainer.global_step] = module.merged.coefficients.weight.detach().clone()

    module = AdaMerging(*zoo, granularity="layer", lr=lr)
    record, select = Record(), SelectStep(every_n_steps=1, criterion=criterion)
    stopper = [SelectionEarlyStopping(patience=early, noise_rows=noise_rows)] if early else []
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[record, select, *stopper],
    )
    dm = datamodule(zoo, data, holdout=8)
    trainer.fit(module, datamodule=dm)
    return module, record, dm, select


def _stop_by_hand(history, patience, row, rows=0):
    """The step at which training stops: the first scoring (from step 1; step 0 is scored before training) after
    which the best score has not risen by more than ``rows`` held-back rows (``row``: one row's share of the score)
    for ``patience`` scorings; None if it never does."""
    best, wait = None, 0
    for step, value in history[1:]:
        if best is None or round((value - best) / row) > rows:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= patience:
                return step
    return None


def test_early_stopping_on_a_flat_criterion_stops_after_patience_scorings(zoo, task_data, tmp_path):
    module, _, _, select = _fit_selected(zoo, task_data, steps=20, early=2, lr=0.0)  # nothing moves: a flat score
    stopper = module.trainer.callbacks[-1]
    # checked at 1 (the best so far), 2, 3: two scorings without a rise
    assert module.trainer.global_step == 3 and stopper.stopped_step == 3
    assert select.result["selected_step"] == 0 and select.result["final_step"] == 3
    out = module.export(tmp_path / "m", entries={**select.manifest_entries(), **stopper.manifest_entries()})
    manifest = json.loads((out / "merge_manifest.json").read_text())
    row = 1 / (len(zoo[1]) * 8)  # one held-back row of one task: 8 rows per task
    assert manifest["early_stopping"] == {
        "monitor": "selection",
        "patience": 2,
        "noise_rows": 0,
        "min_delta": 0.5 * row,  # any rise of one row or more counts
        "stopped_step": 3,
    }


def test_early_stopping_stops_where_the_rule_says_on_a_real_trajectory_and_exports_the_best_step(zoo, task_data):
    _, _, _, full = _fit_selected(zoo, task_data, steps=8)
    history = [tuple(h) for h in full.result["history"]]
    expected = _stop_by_hand(history, patience=1, row=1 / (len(zoo[1]) * 8))
    assert expected is not None and expected < 8  # this trajectory does stop early
    module, record, _, select = _fit_selected(zoo, task_data, steps=8, early=1)
    stopped = expected
    assert module.trainer.global_step == stopped and module.trainer.callbacks[-1].stopped_step == expected
    kept = [h for h in history if h[0] <= stopped]
    assert [tuple(h) for h in select.result["history"]] == kept  # the same trajectory, cut at the stop
    best_step = max(kept, key=lambda h: h[1])[0]
    assert select.result["selected_step"] == best_step
    assert torch.equal(module.merged.coefficients.weight, record.coefficients[best_step])


def test_early_stopping_reads_a_rise_of_noise_rows_as_no_improvement(zoo, task_data):
    import pytorch_lightning as pl

    from adamerge.training.callbacks import SelectionEarlyStopping, SelectStep

    row = 1 / (len(zoo[1]) * 8)  # one held-back row's share of the agreement: 8 rows per task
    rows = [12, 14, 15, 15, 16, 16, 16, 17, 17, 17, 17, 17, 17]  # rows agreeing at steps 0, 1, 2, …

    class Scripted(AdaMerging):  # the real callbacks on a scripted score
        def selection_scores(self, batches, criterion="agreement", expert_logits=None):
            value = rows[self.trainer.global_step] * row
            return value, {t: value for t in self.task_names}

    history = [(step, k * row) for step, k in enumerate(rows)]
    for noise_rows, expected in ((1, 7), (0, 10)):  # by hand: with 1, the +1 rises at 2 and 7 are noise
        assert _stop_by_hand(history, patience=3, row=row, rows=noise_rows) == expected
        module = Scripted(*zoo, granularity="layer")
        select, stopper = SelectStep(every_n_steps=1), SelectionEarlyStopping(patience=3, noise_rows=noise_rows)
        trainer = pl.Trainer(
            max_steps=len(rows) - 1, logger=False, enable_checkpointing=False, callbacks=[select, stopper]
        )
        trainer.fit(module, datamodule=datamodule(zoo, task_data, holdout=8))
        assert trainer.global_step == expected and stopper.stopped_step == expected
        assert select.result["selected_step"] == 7  # the best step seen is still the one exported
        assert stopper.manifest_entries()["early_stopping"]["min_delta"] == (noise_rows + 0.5) * row


def test_early_stopping_needs_a_select_step_before_it(zoo, task_data):
    import pytorch_lightning as pl

    from adamerge.training.callbacks import SelectionEarlyStopping, SelectStep

    for callbacks in ([SelectionEarlyStopping()], [SelectionEarlyStopping(), SelectStep()]):
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=callbacks)
        with pytest.raises(MergeInputError, match="list an adamerge.training.SelectStep before it"):
            trainer.fit(AdaMerging(*zoo), datamodule=datamodule(zoo, task_data, holdout=8))
    with pytest.raises(MergeInputError, match="patience must be >= 1"):
        SelectionEarlyStopping(patience=0)
    with pytest.raises(MergeInputError, match="noise_rows and min_delta must be >= 0"):
        SelectionEarlyStopping(noise_rows=-1)


def test_select_step_restores_the_best_step_and_records_it(zoo, task_data, tmp_path):
    module, record, dm, select = _fit_selected(zoo, task_data)
    sel = select.result  # the manifest's `selection` entry, handed over by the callback
    assert [h[0] for h in sel["history"]] == list(range(7))
    best_step, best = max(sel["history"], key=lambda h: h[1])
    assert sel["selected_step"] == best_step and sel["score"] == best
    assert torch.equal(module.merged.coefficients.weight, record.coefficients[best_step])
    # the score is the agreement with the experts on the held-back rows, recomputed here by hand
    per_task = _agreement_by_hand(module, dm)
    assert abs(sum(per_task.values()) / len(per_task) - best) < 1e-9
    out = module.export(tmp_path / "m", entries=select.manifest_entries())
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["selection"]["selected_step"] == best_step and manifest["selection"]["criterion"] == "agreement"


def _agreement_by_hand(module, dm) -> dict[str, float]:
    """Per-task fraction of held-back rows where the module's prediction equals its expert's (one-hot merge)."""
    per_task = {}
    for b in dm.holdout_batches():
        start = 0
        for task, size in zip(b["tasks"], b["sizes"]):
            rows = {k: v[start : start + size] for k, v in b["inputs"].items()}
            start += size
            with torch.no_grad():
                mine = module.predict(task, rows).argmax(-1)
                expert = module.merged(rows, [task], [size], coefficients=module.merged.one_hot(task))[task].argmax(-1)
            hit, tot = per_task.get(task, (0, 0))
            per_task[task] = (hit + int((mine == expert).sum()), tot + size)
    return {t: h / n for t, (h, n) in per_task.items()}


def test_worst_agreement_selects_the_step_whose_weakest_task_agrees_most(zoo, task_data):
    module, record, dm, select = _fit_selected(zoo, task_data, criterion="worst_agreement")
    sel = select.result
    assert sel["criterion"] == "worst_agreement" and [h[0] for h in sel["per_task"]] == list(range(7))
    # the score of every step is the minimum of its per-task agreements, and the chosen step has the best one
    for (step, value), (step2, per_task) in zip(sel["history"], sel["per_task"]):
        assert step == step2 and value == min(per_task.values()) and set(per_task) == set(task_data)
    best_step, best = max(sel["history"], key=lambda h: h[1])
    assert sel["selected_step"] == best_step and sel["score"] == best
    assert torch.equal(module.merged.coefficients.weight, record.coefficients[best_step])
    # the recorded per-task agreement of the chosen step, recomputed by hand on the restored coefficients
    by_hand = _agreement_by_hand(module, dm)
    recorded = dict(sel["per_task"])[best_step]
    assert all(abs(by_hand[t] - recorded[t]) < 1e-9 for t in task_data)
    assert abs(min(by_hand.values()) - best) < 1e-9


def test_select_step_never_reads_labels(zoo, task_data, tmp_path):
    """Shuffling the label column changes nothing: neither the scores nor the chosen step."""
    runs = [_fit_selected(zoo, _labelled_copy(task_data, tmp_path, seed), steps=4) for seed in (1, 2)]
    assert runs[0][3].result == runs[1][3].result
    assert torch.equal(runs[0][0].merged.coefficients.weight, runs[1][0].merged.coefficients.weight)
    dm = datamodule(zoo, task_data, holdout=8)
    dm.setup()
    assert all(set(b["inputs"]) <= {"input_ids", "attention_mask", "token_type_ids"} for b in dm.holdout_batches())
    assert sum(len(r) for r in dm.held_out.values()) == 8 * len(task_data)
    from collections import Counter

    full = datamodule(zoo, task_data)
    full.setup()
    for task in task_data:  # held-back + training rows are exactly the task's rows, each used once
        key = lambda rs: Counter(tuple(r["input_ids"]) for r in rs)  # noqa: E731
        assert key(dm.held_out[task]) + key(dm.dataset.rows[task]) == key(full.dataset.rows[task])
        assert len(dm.dataset.rows[task]) == 40 - 8


def test_select_step_leaves_the_backbone_in_eval_mode(zoo, task_data):
    """Scoring puts every module in eval mode and gives each its own mode back: the backbone (dropout off, the
    documented training mode) must not come back in train mode after a score."""
    module, record, _, _ = _fit_selected(zoo, task_data, steps=3)
    assert record.backbone_training == [False, False, False]
    assert not any(m.training for m in module.merged.backbone.modules())


def test_select_step_refuses_an_unknown_criterion_when_built():
    from adamerge.training.callbacks import SelectStep

    with pytest.raises(
        MergeInputError,
        match=r"criterion: unknown value 'worst'; allowed: agreement, "
        r"worst_agreement, objective",
    ):
        SelectStep(criterion="worst")


def test_select_step_needs_held_back_rows(zoo, task_data):
    import pytorch_lightning as pl

    from adamerge.training.callbacks import SelectStep

    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[SelectStep()],
    )
    with pytest.raises(MergeInputError, match="holdout"):
        trainer.fit(AdaMerging(*zoo), datamodule=datamodule(zoo, task_data))


@pytest.mark.parametrize("mode", ["expected", "continuous", "threshold"])
def test_concrete_export_masks_at_init(zoo, batch, mode):
    """Logits 0: ``expected`` (sigmoid 0.5 everywhere, rescaled to 1) and ``threshold`` (all kept) are exactly Task
    Arithmetic; ``continuous`` is a seeded relaxed draw with mean 1 that differs from it and repeats."""
    module = ConcreteTaskArithmetic(*zoo, scale=0.3, export_mask=mode)
    ta = TaskArithmetic(*zoo, scale=0.3).final_merged_params()
    got = module.final_merged_params()
    diff = max(float((got[n] - ta[n]).abs().max()) for n in ta)
    if mode == "continuous":
        assert diff > 1e-4
        masks = module.hard_mask()
        assert all(abs(float(m.mean()) - 1.0) < 1e-5 for m in masks.values())
        again = module.final_merged_params()
        assert all(torch.equal(got[n], again[n]) for n in got)
    else:
        assert diff < 1e-6


def test_concrete_rejects_unknown_export_mask(zoo):
    with pytest.raises(MergeInputError, match="export_mask"):
        ConcreteTaskArithmetic(*zoo, export_mask="soft")


def test_frozen_head_zoo_keeps_the_probe_bit_identical(tmp_path):
    """LP-FT: the head is a linear probe fitted on the frozen base before fine-tuning and never changes after; the
    body does change."""
    import datasets
    from conftest import make_tokenizer, text_rows, tiny_config
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    from benchmarks.zoo import finetune

    zoo = tmp_path / "zoo"
    make_tokenizer(zoo / "base")
    torch.manual_seed(0)
    config = tiny_config()
    config.initializer_range = 0.5  # features that differ between rows (the default 0.02 makes them near-constant)
    BertForSequenceClassification(config).save_pretrained(str(zoo / "base"))
    texts = text_rows(64, seed=5)
    labels = [int("good" in t or "great" in t or "love" in t) for t in texts]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"])})
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)}
    ).save_to_disk(str(tmp_path / "data" / "toy"))
    path = finetune("toy", tmp_path / "data", zoo, epochs=1, batch_size=16, lr=1e-3, max_length=16, head="frozen")
    assert path == zoo / "frozen-head" / "toy"
    probe = load_file(str(path / "lp_head.safetensors"))
    tuned = BertForSequenceClassification.from_pretrained(str(path))
    base = BertForSequenceClassification.from_pretrained(str(zoo / "base"))
    assert torch.equal(tuned.classifier.weight, probe["classifier.weight"])
    assert torch.equal(tuned.classifier.bias, probe["classifier.bias"])
    assert probe["classifier.weight"].abs().max() > 0  # fitted, not the zero start
    info = json.loads((path / "train_info.json").read_text())
    share = sum(labels) / len(labels)
    constant = -(share * math.log(share) + (1 - share) * math.log(1 - share))  # CE of the best constant predictor
    assert info["head"] == "frozen" and info["linear_probe"]["train_loss"] < constant - 0.01
    moved = max(
        float((a - b).abs().max())
        for (n, a), (_, b) in zip(tuned.bert.named_parameters(), base.bert.named_parameters())
    )
    assert moved > 1e-4


@pytest.mark.parametrize("prep", [{"ties_density": 0.2}, {"subspace": "tsv"}, {"dare_rate": 0.5}])
def test_guided_objectives_read_the_fine_tunes_themselves_under_prep(zoo, prep):
    """With TIES/DARE/TSV prep the merge's stores hold processed task vectors; the experts that guide training
    (and that label-free selection compares with) must still be the fine-tunes. Reference: each fine-tune's own
    backbone weights, loaded with stock transformers."""
    from transformers import AutoModel

    from adamerge.methods.base import TaskVectorPrep

    base, paths = zoo
    guided = AdaMerging(base, paths, objective="kl", prep=TaskVectorPrep(**prep))
    plain = AdaMerging(base, paths, prep=TaskVectorPrep(**prep))  # entropy reads no expert: nothing extra kept
    assert plain.merged.expert_stores is None and guided.merged.expert_stores is not None
    for task, path in paths.items():
        own = AutoModel.from_pretrained(path).state_dict()
        experts, processed = guided.merged.expert_params(task), plain.merged.expert_params(task)
        names = [n for n in experts if n in own]
        assert len(names) == len(guided.merged.param_names)
        assert max((experts[n] - own[n]).abs().max().item() for n in names) < 1e-6
        # what the experts were before the fix: base + the processed vector, visibly not the fine-tune
        assert max((processed[n] - own[n]).abs().max().item() for n in names) > 1e-3


def test_select_step_warns_when_its_experts_are_processed_vectors(zoo, task_data, caplog):
    """Entropy reads no expert, so under prep only the processed vectors are kept: agreement would be measured
    against base + those. Said once, at the first score; with a guided objective nothing is said."""
    import pytorch_lightning as pl

    from adamerge.methods.base import TaskVectorPrep
    from adamerge.training.callbacks import SelectStep

    for objective, warned in (("entropy", True), ("kl", False)):
        caplog.clear()
        module = AdaMerging(*zoo, objective=objective, prep=TaskVectorPrep(ties_density=0.2))
        trainer = pl.Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[SelectStep()],
        )
        with caplog.at_level("WARNING", logger="adamerge.training.callbacks"):
            trainer.fit(module, datamodule=datamodule(zoo, task_data, holdout=8))
        assert any("processed task vectors" in r.getMessage() for r in caplog.records) is warned
