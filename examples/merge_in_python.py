#!/usr/bin/env python
"""Merge your own fine-tunes from Python (a notebook, a script): the same recipe `adamerge init` writes for
fine-tunes that trained their own heads, built in Python and trained with a Lightning Trainer, then exported and
evaluated.

    python examples/merge_in_python.py --base BASE --models sst2=./ft-sst2 ... --data sst2=./sst2.txt ... \
        --eval sst2=./sst2-test.csv ... --out runs/merged [--steps 500]

`--data`: unlabeled rows (.txt, a folder of .txt, .csv/.json with a `text` column); `--eval`: labelled rows (a `text`
and a `label` column). tests/test_examples.py runs it on tiny models.
"""

import argparse
import json

import pytorch_lightning as pl

import adamerge


def pairs(values):
    return dict(v.split("=", 1) for v in values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="+", required=True, metavar="TASK=PATH")
    p.add_argument("--data", nargs="+", required=True, metavar="TASK=PATH")
    p.add_argument("--eval", nargs="+", required=True, metavar="TASK=PATH")
    p.add_argument("--out", default="runs/merged")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--samples-per-task", type=int, default=16)
    p.add_argument("--holdout", type=int, default=64)
    args = p.parse_args()
    adamerge.quiet_libraries()

    # the method: layer-wise coefficients over TSV-M's per-task pieces, heads tuned, KL to each fine-tune
    module = adamerge.AdaMerging(
        args.base,
        pairs(args.models),
        granularity="layer",
        prep={"subspace": "tsv"},
        init=1.0,
        objective={"name": "kl", "temperature": 2.0},
        tune_heads=True,
        heads={"pooler": True},  # BERT-style models: each head keeps its fine-tune's pooler
    )
    data = adamerge.UnlabeledDataModule(
        {task: adamerge.TaskData(path) for task, path in pairs(args.data).items()},
        tokenizer=args.base,
        samples_per_task=args.samples_per_task,
        holdout=args.holdout,  # rows held back to choose the exported step without labels
    )
    select = adamerge.SelectStep(every_n_steps=max(1, args.steps // 50))
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[select], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)

    # the export: a directory stock transformers loads; the run hands its selection and data to the manifest
    out = module.export(args.out, overwrite=True, entries=adamerge.run_entries(trainer))
    scores = adamerge.evaluate_checkpoint(str(out), {task: {"path": path} for task, path in pairs(args.eval).items()})
    print(json.dumps({"export": str(out), "selected_step": select.result["selected_step"], "scores": scores}))


if __name__ == "__main__":
    main()
