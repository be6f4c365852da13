#!/usr/bin/env python
"""The main job: train a merge of four packaged-model fine-tunes on unlabeled data, export it, compare it.

    python scripts/quickstart.py                 # minutes on a laptop CPU; a GPU is used when there is one
    python scripts/quickstart.py --steps 200     # longer adaptation

Prepares four real text tasks from packages, fine-tunes a small zoo of the packaged all-MiniLM-L6-v2 (cached),
runs `adamerge fit --config configs/benchmark/quickstart.yaml` (W&B offline), then scores the exported checkpoint —
loaded with
stock transformers — against Task Arithmetic and the individual fine-tunes. See benchmarks/quickstart.py.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from adamerge import quiet_libraries  # noqa: E402
from benchmarks.quickstart import Settings, report, run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="adaptation steps (default: the config's trainer.max_steps)")
    p.add_argument("--work", type=Path, default=Path(".cache"), help="cache of wheels, data and zoo")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="one directory per run inside")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    print(report(run(args.work, args.out, Settings(steps=args.steps))))


if __name__ == "__main__":
    main()
