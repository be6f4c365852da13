#!/usr/bin/env python
"""Question: how much of Task Arithmetic's loss on a BatchNorm CNN is one set of statistics for every task? Answer: a
third at 64×64 (per-task 67.6 against mixed 55.0, experts 94.8), a fifth at 32×32 (48.4 against 37.2).

Diagnostic for BatchNorm zoos: Task Arithmetic's accuracy when the merge's BatchNorm statistics are re-estimated
on each task's own unlabeled rows (one set per task) against one set over all tasks' rows mixed (what an export of
one merged model holds today).

    python experiments/vision_bn_groups.py .cache/vision/zoo-64px      # the vision64 preset's own-head zoo
    python experiments/vision_bn_groups.py .cache/vision/zoo           # the vision preset's (32×32)

Rows: the first 512 of each task's ``unlabeled`` split (never ``test``; digits has 359); the first 256 re-estimate
the statistics, the others are scored with their labels. It selects nothing: it says how much of Task Arithmetic's
loss on a BatchNorm CNN is the mixed statistics.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from benchmarks.vision import VISION_TASKS  # noqa: E402

TASKS = list(VISION_TASKS)  # the vision benchmark's tasks, in its order


def main() -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from adamerge.core.batchnorm import recalibrate_batchnorm
    from benchmarks.vision import split_pixels

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("zoo", type=Path)
    p.add_argument("--data", type=Path, default=Path(".cache/vision/data"))
    p.add_argument("--scales", type=float, nargs="*", default=[0.3, 0.5, 1.0])
    args = p.parse_args()
    proc = AutoImageProcessor.from_pretrained(str(args.zoo / "base"))
    px, ys = {}, {}
    for t in TASKS:
        px[t], ys[t] = split_pixels(args.data / t, "unlabeled", proc, limit=512)
    base = AutoModelForImageClassification.from_pretrained(str(args.zoo / "base")).state_dict()
    models = {t: AutoModelForImageClassification.from_pretrained(str(args.zoo / t)) for t in TASKS}
    tuned = {t: m.state_dict() for t, m in models.items()}
    keys = [
        k for k, v in base.items() if not k.startswith("classifier") and v.is_floating_point() and "running" not in k
    ]

    def accuracy(model, t, params=None):
        """On rows 256: of task ``t``, ``model`` run with ``params`` bound (merged weights, statistics) if given."""
        with torch.no_grad():
            logits = functional_call(model, params or {}, args=(), kwargs={"pixel_values": px[t][256:]}).logits
        return (logits.argmax(-1) == ys[t][256:]).float().mean().item()

    out = {"experts": {t: accuracy(models[t], t) for t in TASKS}}
    for lam in args.scales:
        merged = {k: base[k] + lam * sum(tuned[t][k] - base[k] for t in TASKS) for k in keys}
        per_task, mixed = {}, {}
        for t in TASKS:  # the merged body under task t's own head (the head and nothing else stays the expert's)
            model = models[t]
            own = recalibrate_batchnorm(model, merged, [{"pixel_values": px[t][i : i + 64]} for i in range(0, 256, 64)])
            per_task[t] = accuracy(model, t, {**merged, **own})
            mix = recalibrate_batchnorm(
                model,
                merged,
                [{"pixel_values": torch.cat([px[u][i : i + 16] for u in TASKS])} for i in range(0, 256, 16)],
            )
            mixed[t] = accuracy(model, t, {**merged, **mix})
        out[f"task_arithmetic_{lam:g}"] = {"per_task_statistics": per_task, "mixed_statistics": mixed}
    avg = {
        k: ({s: sum(v[s].values()) / len(TASKS) for s in v} if "experts" != k else sum(v.values()) / len(TASKS))
        for k, v in out.items()
    }
    print(json.dumps({"zoo": str(args.zoo), "average": avg, "per_task": out}, indent=1))


if __name__ == "__main__":
    main()
