"""Scoring: accuracy, macro-F1 and the histograms behind them, against closed forms; the below-pretrained report."""

from __future__ import annotations

import torch

from adamerge.evaluate import score
from benchmarks.run import below_pretrained_lines


def test_score_histograms_and_metrics_by_hand():
    # 7 rows, 3 classes; row i predicts preds[i] (a one-hot logit), its label is labels[i]
    preds = [0, 0, 0, 1, 2, 2, 0]
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 0])
    logits = torch.nn.functional.one_hot(torch.tensor(preds), 3).float() * 5.0
    out = score(lambda idx: logits[idx], list(range(7)), labels, 3, torch.tensor, batch_size=3)
    assert out["predicted"] == [4, 1, 2] and out["labels"] == [4, 2, 1] and out["n"] == 7
    assert abs(out["accuracy"] - 5 / 7) < 1e-6  # rows 0, 2, 3, 4, 6
    # per class: precision 3/4, 1/1, 1/2; recall 3/4, 1/2, 1/1 → F1 3/4, 2/3, 2/3
    assert abs(out["macro_f1"] - (3 / 4 + 2 / 3 + 2 / 3) / 3) < 1e-6


def _row(label, acc, predicted=None):
    m = {"accuracy": acc, "macro_f1": acc, "n": 10}
    if predicted is not None:
        m["predicted"], m["labels"] = predicted, [8, 2]
    return {"label": label, "inductive": {"spam": m, "ham": {"accuracy": 0.9, "macro_f1": 0.9, "n": 10}}}


def test_below_pretrained_lines_name_each_row_below_with_its_histogram():
    rows = {
        "individual": _row("Individual", 1.0, [8, 2]),
        "pretrained": _row("Pretrained", 0.8, [10, 0]),
        "task_arithmetic": _row("TA", 0.6, [4, 6]),
        "kl": _row("KL", 0.9, [7, 3]),
        "pl": _row("PL", 0.7),
    }
    lines = below_pretrained_lines(rows, ["spam", "ham"])
    assert lines[2:] == [
        "- spam (test rows per class [8, 2]): Pretrained 80.0 [10, 0]; below it: TA 60.0 [4, 6]; PL 70.0."
    ]
    rows["pretrained"] = _row("Pretrained", 0.5)
    assert below_pretrained_lines(rows, ["spam", "ham"]) == []


def test_plot_coefficients_prints_each_blocks_mean_and_writes_a_png(tmp_path, capsys):
    """benchmarks/plot_coefficients.py on a hand-written manifest: the printed block means are the means over each
    layer's tensors computed here by hand (embeddings 0.1 and 0.3 → 0.2; layer 0: 0.5; layer 1: 0.7 and 0.9 → 0.8)."""
    import importlib.util
    import json
    from pathlib import Path

    export = tmp_path / "merged"
    export.mkdir()
    params = [
        "embeddings.word_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.output.dense.weight",
        "encoder.layer.1.output.dense.bias",
    ]
    effective = [[0.1, 0.3, 0.5, 0.7, 0.9], [1.0, 1.0, 0.0, 0.2, 0.4]]
    (export / "merge_manifest.json").write_text(
        json.dumps(
            {"coefficients": {"tasks": ["a", "b"], "params": params, "effective": effective, "granularity": "layer"}}
        )
    )
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_coefficients.py"
    spec = importlib.util.spec_from_file_location("plot_coefficients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(export), "--out", str(tmp_path / "c.png")])
    lines = capsys.readouterr().out.splitlines()
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in lines
        if line.startswith("  a ") or line.startswith("  b ")
    }
    assert rows["a"] == [0.2, 0.5, 0.8] and rows["b"] == [1.0, 0.0, 0.3]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a benchmark row's recorded block means print as they are
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "rows": {
                    "x": {
                        "coefficient_blocks": {
                            "tasks": ["a"],
                            "blocks": ["embeddings", "layer 0"],
                            "values": [[0.25, 0.75]],
                        }
                    }
                }
            }
        )
    )
    module.main([f"{results}#x", "--out", str(tmp_path / "d.png")])
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  a ")]
    assert printed == [["a", "0.250", "0.750"]] and (tmp_path / "d.png").is_file()
