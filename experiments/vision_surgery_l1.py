#!/usr/bin/env python
"""Question: do Surgery's adapters learn less from an export with per-task BatchNorm statistics? Answer: yes, their L1
objective falls 2.56 → 2.15 (−16%) from the one-set Task Arithmetic export, 2.44 → 2.26 (−7%) from the per-task one
(vision64).

Diagnostic for Surgery on BatchNorm zoos: its adapters' own objective (L1 between each task's corrected merged
feature and its expert's, summed over tasks, mean of the first 4 unlabeled steps) before and after 100 training
steps, for Surgery started from each export given — e.g. a Task Arithmetic export with one set of BatchNorm
statistics and one with each task's own (``batchnorm_statistics: task``), as the vision64 benchmark writes them:

    python experiments/vision_surgery_l1.py runs/vision64/vision64/checkpoints/task_arithmetic-inductive \\
        runs/vision64/vision64-bn-task/checkpoints/task_arithmetic-inductive

Unlabeled rows only (the ``unlabeled`` split, as the benchmark trains on); it selects nothing. Prints one JSON line
per export.
"""

import argparse
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from benchmarks.vision import VISION_TASKS  # noqa: E402

TASKS = list(VISION_TASKS)  # the vision benchmark's tasks, in its order


def main() -> None:
    from adamerge.io.datasets import TaskData
    from adamerge.methods import Surgery
    from adamerge.training.datamodule import UnlabeledDataModule

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", type=Path, help="merged checkpoints of the zoo to start Surgery from")
    p.add_argument("--zoo", type=Path, default=Path(".cache/vision/zoo-64px"))
    p.add_argument("--data", type=Path, default=Path(".cache/vision/data"))
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    paths = {t: str(args.zoo / t) for t in TASKS}
    for export in args.exports:
        module = Surgery(str(args.zoo / "base"), paths, merged=str(export), task_type="image_cls")
        dm = UnlabeledDataModule(
            {t: TaskData(str(args.data / t), split="unlabeled", image_column="image") for t in TASKS},
            tokenizer=str(args.zoo / "base"),
            samples_per_task=16,
            seed=0,
        )
        dm.setup("fit")
        probe = dm.first_steps(4)

        def l1() -> float:
            with torch.no_grad():
                return sum(float(module.surgery_loss(b)[0]) for b in probe) / len(probe)

        before = l1()
        pl.seed_everything(0, verbose=False)
        pl.Trainer(
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        ).fit(module, datamodule=dm)
        print(
            json.dumps(
                {
                    "export": str(export),
                    "per_task_statistics": bool(module.bn_task_stats),
                    "l1_before": round(before, 4),
                    "l1_after": round(l1(), 4),
                    "steps": args.steps,
                }
            )
        )


if __name__ == "__main__":
    main()
