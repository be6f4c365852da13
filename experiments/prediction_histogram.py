#!/usr/bin/env python
"""Question: why is layer-wise AdaMerging below Task Arithmetic on the quick text zoo? Answer: entropy minimisation
collapses `question` onto its rarest class (ABBR 854 of 1,000 predictions; accuracy 0.120 against 0.407).

Diagnose a merge on one task: class histogram of its predictions, accuracy and mean entropy, per checkpoint.

    python experiments/prediction_histogram.py --task question --data .cache/data/question \
        runs/benchmark/quick/checkpoints/task_arithmetic-inductive
        runs/benchmark/quick/checkpoints/adamerging_layer-inductive

Entropy minimisation can lower the objective by collapsing a task onto one class; this shows it.
"""

import argparse
import collections
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from adamerge import load_merged  # noqa: E402
from adamerge.cli.app import quiet_libraries
from adamerge.core.functional import entropy
from adamerge.io.datasets import TaskData, pad_batch, tokenize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="exported merges (adamerge fit/merge output directories)")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, help="a save_to_disk DatasetDict with text/label columns")
    p.add_argument("--split", default="test")
    p.add_argument("--max-length", type=int, default=64)
    args = p.parse_args()
    quiet_libraries()
    ds = datasets.load_from_disk(args.data)[args.split]
    names = ds.features["label"].names
    labels = torch.tensor(ds["label"])
    print(f"true classes: {dict(sorted(collections.Counter(names[i] for i in ds['label']).items()))}")
    for ckpt in args.checkpoints:
        model = load_merged(ckpt)
        tok = AutoTokenizer.from_pretrained(ckpt)
        rows = tokenize(tok, ds, TaskData(args.data), args.max_length)
        with torch.no_grad():
            logits = torch.cat(
                [
                    model.predict(args.task, **pad_batch(rows[i : i + 128], tok.pad_token_id or 0))
                    for i in range(0, len(rows), 128)
                ]
            )
        pred = logits.argmax(-1)
        hist = dict(sorted(collections.Counter(names[i] for i in pred.tolist()).items()))
        print(
            f"{ckpt}: accuracy {(pred == labels).float().mean():.3f}, mean entropy "
            f"{entropy(logits).mean():.3f}, predicted classes {hist}"
        )


if __name__ == "__main__":
    main()
