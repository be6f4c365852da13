"""The examples run as written: examples/merge_in_python.py merges tiny fine-tunes from Python, exports a merge
stock transformers loads and evaluates it."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import text_rows

ROOT = Path(__file__).resolve().parents[1]


def test_merge_in_python_trains_exports_and_evaluates(zoo, tmp_path):
    base, paths = zoo
    data, labelled = {}, {}
    for i, task in enumerate(paths):
        rows = text_rows(40, seed=i)
        data[task] = tmp_path / f"{task}.txt"
        data[task].write_text("\n".join(rows) + "\n")
        labelled[task] = tmp_path / f"{task}.csv"
        with labelled[task].open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([r, j % 2] for j, r in enumerate(rows))
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "merge_in_python.py"), "--base", base,
         "--models", *(f"{t}={p}" for t, p in paths.items()), "--data", *(f"{t}={p}" for t, p in data.items()),
         "--eval", *(f"{t}={p}" for t, p in labelled.items()), "--out", str(tmp_path / "merged"),
         "--steps", "4", "--samples-per-task", "4", "--holdout", "8"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(report["scores"]) == {*paths, "average"} and 0 <= report["scores"]["average"]["accuracy"] <= 1
    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert manifest["selection"]["selected_step"] == report["selected_step"]
    assert manifest["hparams"]["objective"]["name"] == "kl" and manifest["data"]["tasks"]["spam"]["path"] == str(
        data["spam"]
    )
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged" / "tasks" / "spam"))
