"""``heads: {pooler: true}``: each task's head keeps its fine-tune's pooler. References are computed by hand from the
saved checkpoints with plain ``transformers`` modules (no adamerge code)."""

from __future__ import annotations

import json

import pytest
import torch

from adamerge.errors import MergeInputError
from adamerge.methods import AdaMerging, Surgery, TaskArithmetic

POOLER = {"pooler": True}


@pytest.fixture(scope="module")
def rows(zoo):
    from conftest import mixed_batch

    b = mixed_batch(zoo[0])
    return {k: v[:2] for k, v in b["inputs"].items()}


def by_hand_logits(zoo, task: str, lam: float, rows) -> torch.Tensor:
    """Task Arithmetic (λ) of the backbones computed from the saved fine-tunes, then the fine-tune's own pooler and
    classifier on the merged encoder's [CLS] state."""
    from transformers import AutoModelForSequenceClassification, BertModel

    base_path, paths = zoo
    base = AutoModelForSequenceClassification.from_pretrained(base_path).bert.state_dict()
    fts = {t: AutoModelForSequenceClassification.from_pretrained(p) for t, p in paths.items()}
    merged = {
        k: v + lam * sum(ft.bert.state_dict()[k] - v for ft in fts.values()) if v.is_floating_point() else v
        for k, v in base.items()
    }
    encoder = BertModel(fts[task].config, add_pooling_layer=False).eval()
    encoder.load_state_dict({k: v for k, v in merged.items() if not k.startswith("pooler.")}, strict=False)
    ft = fts[task].eval()
    with torch.no_grad():
        cls = encoder(**rows).last_hidden_state[:, 0]
        return ft.classifier(torch.tanh(cls @ ft.bert.pooler.dense.weight.T + ft.bert.pooler.dense.bias))


def test_pooler_heads_read_each_fine_tunes_pooler_on_the_merged_encoder(zoo, rows):
    plain = TaskArithmetic(*zoo, scale=0.3)
    module = TaskArithmetic(*zoo, scale=0.3, heads=POOLER)
    for task in zoo[1]:
        want = by_hand_logits(zoo, task, 0.3, rows)
        with torch.no_grad():
            got, merged_pooler = module.predict(task, rows), plain.predict(task, rows)
        assert (got - want).abs().max() < 1e-5
        assert (merged_pooler - want).abs().max() > 1e-3  # the merged pooler gives other logits: the option acts
        # at the expert's own weights both are the fine-tune itself
        from transformers import AutoModelForSequenceClassification

        ft = AutoModelForSequenceClassification.from_pretrained(zoo[1][task]).eval()
        with torch.no_grad():
            expert = module.predict(task, rows, module.merged.expert_params(task))
            assert (expert - ft(**rows).logits).abs().max() < 1e-5


def test_pooler_heads_export_stock_task_models_with_their_own_pooler(zoo, rows, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    from adamerge import load_merged

    module = TaskArithmetic(*zoo, scale=0.3, heads=POOLER)
    out = module.export(tmp_path / "merged")
    root = AutoModel.from_pretrained(str(out))
    merged = module.final_merged_params()
    assert torch.equal(root.pooler.dense.weight, merged["pooler.dense.weight"])  # the root keeps the merged pooler
    loaded = load_merged(out)
    for task, path in zoo[1].items():
        ft = AutoModelForSequenceClassification.from_pretrained(path)
        stock = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / task)).eval()
        assert torch.equal(stock.bert.pooler.dense.weight, ft.bert.pooler.dense.weight)
        assert not torch.equal(stock.bert.pooler.dense.weight, root.pooler.dense.weight)
        assert torch.equal(
            stock.bert.encoder.layer[0].attention.self.query.weight, root.encoder.layer[0].attention.self.query.weight
        )
        with torch.no_grad():
            want = by_hand_logits(zoo, task, 0.3, rows)
            assert (stock(**rows).logits - want).abs().max() < 1e-5
            assert (loaded.predict(task, **rows) - want).abs().max() < 1e-5
    heads = load_file(str(out / "heads.safetensors"))
    assert any(k.endswith("/bert.pooler.dense.weight") for k in heads)


def test_tuned_pooler_heads_train_and_export(zoo, task_data, rows, tmp_path):
    from conftest import quick_fit
    from transformers import AutoModelForSequenceClassification

    from adamerge.io.datasets import TaskData
    from adamerge.training.datamodule import UnlabeledDataModule

    module = AdaMerging(*zoo, granularity="layer", objective="kl", tune_heads=True, lr=0.05, heads=POOLER)
    before = {t: h.bert.pooler.dense.weight.detach().clone() for t, h in module.merged.heads.items()}
    assert any(".bert.pooler." in k for k in module.trainable_state_keys())
    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, tokenizer=zoo[0], samples_per_task=4, max_length=16
    )
    quick_fit(module, dm, 3)
    out = module.export(tmp_path / "merged")
    for task, h in module.merged.heads.items():
        assert (h.bert.pooler.dense.weight - before[task]).abs().max() > 1e-4  # trained
        assert torch.equal(module.expert_heads[task].bert.pooler.dense.weight, before[task])  # teacher kept its own
        stock = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / task)).eval()
        assert torch.equal(stock.bert.pooler.dense.weight, h.bert.pooler.dense.weight.detach())
        with torch.no_grad():
            assert (stock(**rows).logits - module.predict(task, rows)).abs().max() < 1e-5


def test_lora_pooler_heads_hold_the_adapters_merged_pooler(zoo, tmp_path):
    from test_lora import make_adapter, peft_merged

    base = zoo[0]
    adapters = {
        "sentiment": make_adapter(base, tmp_path / "a", 2, seed=0, targets=("query", "dense")),
        "topic": make_adapter(base, tmp_path / "b", 3, seed=1, targets=("query",)),
    }
    module = TaskArithmetic(base, adapters, heads=POOLER)
    for (task, path), n in zip(adapters.items(), (2, 3)):
        want = peft_merged(base, path, n).bert.pooler.dense.weight  # peft's own merge_and_unload
        got = module.merged.heads[task].bert.pooler.dense.weight
        assert (got - want).abs().max() < 1e-6
    from transformers import AutoModelForSequenceClassification

    base_pooler = AutoModelForSequenceClassification.from_pretrained(base).bert.pooler.dense.weight
    assert not torch.equal(module.merged.heads["sentiment"].bert.pooler.dense.weight, base_pooler)  # LoRA on it
    assert torch.equal(module.merged.heads["topic"].bert.pooler.dense.weight, base_pooler)  # untouched


def test_surgery_on_pooler_heads_adapts_the_tokens(zoo, tmp_path):
    merged = TaskArithmetic(*zoo, scale=0.3, heads=POOLER).export(tmp_path / "ta")
    module = Surgery(*zoo, merged=str(merged), heads=POOLER)
    assert module.feature == "last_hidden_state"
    with pytest.raises(MergeInputError, match="pooler_output"):
        Surgery(*zoo, merged=str(merged), feature="pooler_output", heads=POOLER)


def test_pooler_heads_refuse_bad_options_and_models_without_a_pooler(zoo, tmp_path):
    from conftest import make_tokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification

    with pytest.raises(MergeInputError, match="unknown option"):
        TaskArithmetic(*zoo, heads={"pooler": True, "classnames": ["a"]})
    cfg = RobertaConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    for name in ("base", "ft"):
        RobertaForSequenceClassification(cfg).save_pretrained(str(tmp_path / name))
        make_tokenizer(tmp_path / name)
    with pytest.raises(MergeInputError, match="no pooler"):
        TaskArithmetic(str(tmp_path / "base"), {"t": str(tmp_path / "ft")}, heads=POOLER)
    assert not (tmp_path / "out").exists()


def test_pooler_heads_recorded_in_the_manifest(zoo, tmp_path):
    out = TaskArithmetic(*zoo, scale=0.3, heads=POOLER).export(tmp_path / "m")
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["head_options"] == POOLER
    assert all("bert.pooler.dense.weight" in h["params"] for h in manifest["heads"].values())
    card = (out / "README.md").read_text()  # the Hub card tells users to classify with tasks/<task>/, not the root
    assert "keeps its fine-tune's own pooler" in card and "classify with `tasks/<task>/`" in card
    plain = TaskArithmetic(*zoo, scale=0.3).export(tmp_path / "plain")
    assert "own pooler" not in (plain / "README.md").read_text()
    assert "head_options" not in json.loads((plain / "merge_manifest.json").read_text())
