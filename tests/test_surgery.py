"""Representation Surgery: identity at init, the loss decreases, export/load round trip is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import quick_fit

from adamerge import MergeInputError, load_merged
from adamerge.io.datasets import TaskData
from adamerge.methods import Surgery, TaskArithmetic
from adamerge.training.datamodule import UnlabeledDataModule


@pytest.fixture(scope="module")
def merged_dir(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("surgery") / "ta"
    TaskArithmetic(*zoo, scale=0.3).export(out, per_task_models=False)
    return out


@pytest.fixture(scope="module")
def dm(zoo, task_data):
    d = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, tokenizer=zoo[0], samples_per_task=8, max_length=16
    )
    d.setup()
    return d


def test_identity_at_init(zoo, merged_dir, dm):
    surgery = Surgery(*zoo, merged=str(merged_dir))
    ta = TaskArithmetic(*zoo, scale=0.3)
    b = dm.dataset[0]
    with torch.no_grad():
        plain = ta.merged(b["inputs"], b["tasks"], b["sizes"])
        for i, task in enumerate(b["tasks"]):
            rows = {k: v[8 * i : 8 * i + 8] for k, v in b["inputs"].items()}
            assert torch.equal(surgery.predict(task, rows), plain[task])
    assert sorted(n for n, p in surgery.named_parameters() if p.requires_grad) == sorted(
        f"adapters.{t}.{w}.weight" for t in b["tasks"] for w in ("down", "up")
    )


def test_loss_decreases_and_export_round_trip(zoo, merged_dir, dm, tmp_path):
    surgery = Surgery(*zoo, merged=str(merged_dir), rank=8, lr=1e-2)
    batch = dm.dataset[0]
    with torch.no_grad():
        before = float(surgery.surgery_loss(batch)[0])
    quick_fit(surgery, dm, 30)
    with torch.no_grad():
        after = float(surgery.surgery_loss(batch)[0])
    assert after < 0.8 * before, (before, after)

    surgery.export(tmp_path / "out", per_task_models=False)
    loaded = load_merged(tmp_path / "out")
    assert loaded.manifest["base_merge"]["method"] == "task_arithmetic"
    assert set(loaded.hooks[0].adapters) == set(zoo[1])
    for i, task in enumerate(batch["tasks"]):
        rows = {k: v[8 * i : 8 * i + 8] for k, v in batch["inputs"].items()}
        with torch.no_grad():
            expected = surgery.predict(task, rows)
        assert torch.equal(loaded.predict(task, **rows), expected)
        assert not torch.equal(expected, load_merged(merged_dir).predict(task, **rows))  # the adapters matter


def test_surgery_refuses_a_merge_of_other_models(zoo, merged_dir):
    base, paths = zoo
    with pytest.raises(MergeInputError, match="merged from other models"):
        Surgery(base, {"sentiment": paths["sentiment"], "spam": paths["spam"], "topic": base}, merged=str(merged_dir))


def test_evaluate_scores_a_surgery_export_with_its_adapters(zoo, merged_dir, dm, task_data, tmp_path):
    """`adamerge evaluate` on a Surgery export = the in-memory Surgery module's accuracy, not the underlying merge's."""
    from transformers import AutoTokenizer

    from adamerge.evaluate import evaluate_checkpoint
    from adamerge.io.datasets import load_texts, pad_batch, tokenize

    surgery = Surgery(*zoo, merged=str(merged_dir), rank=8, lr=5e-2)
    quick_fit(surgery, dm, 5)
    with torch.no_grad():  # adapters strong enough to change predictions, so the check can tell them apart
        for adapter in surgery.adapters.values():
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=torch.Generator().manual_seed(1)))
    surgery.export(tmp_path / "out", per_task_models=False)
    tasks = {t: {"path": p} for t, p in task_data.items()}
    got = evaluate_checkpoint(str(tmp_path / "out"), tasks, max_length=16)
    tok = AutoTokenizer.from_pretrained(zoo[0])
    for task, p in task_data.items():
        ds = load_texts(TaskData(p), task, extra_columns=("label",))
        rows = tokenize(tok, ds, TaskData(p), 16)
        with torch.no_grad():
            pred = surgery.predict(task, pad_batch(rows, tok.pad_token_id)).argmax(-1)
        expected = float((pred == torch.tensor(ds["label"])).float().mean())
        assert abs(got[task]["accuracy"] - expected) < 1e-6, task
    # the logits evaluate scores with are the Surgery module's, and differ from the underlying merge's
    import json

    from adamerge.evaluate import _predictor
    from adamerge.kinds import get_kind

    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    predictor = _predictor(str(tmp_path / "out"), manifest, None, list(task_data), get_kind("seq_cls"))
    b = dm.dataset[0]
    for i, task in enumerate(b["tasks"]):
        rows = {k: v[8 * i : 8 * i + 8] for k, v in b["inputs"].items()}
        with torch.no_grad():
            logits = predictor(task)[0](rows)
            torch.testing.assert_close(logits, surgery.predict(task, rows), atol=1e-5, rtol=1e-5)
            assert (logits - load_merged(merged_dir).predict(task, **rows)).abs().max() > 1e-3


def test_an_export_written_before_extensions_were_recorded_is_served_with_its_adapters(zoo, tmp_path):
    """Exports of earlier releases name no `extensions`: their Surgery entry still brings the adapters back."""
    import json

    import torch

    from adamerge import load_merged
    from adamerge.methods import Surgery, TaskArithmetic

    base, paths = zoo
    merged = TaskArithmetic(base, paths).export(tmp_path / "ta", per_task_models=False)
    surgery = Surgery(base, paths, merged=str(merged), rank=4)
    with torch.no_grad():
        for adapter in surgery.adapters.values():
            adapter.up.weight.normal_(0, 0.5)
    out = surgery.export(tmp_path / "s", model_card=False)
    manifest_path = out / "merge_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    want = load_merged(out)
    del manifest["extensions"]
    manifest_path.write_text(json.dumps(manifest))
    got = load_merged(out)
    assert len(got.hooks) == 1 and set(got.hooks[0].adapters) == set(paths)
    x = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    torch.testing.assert_close(got.predict("spam", **x), want.predict("spam", **x))
