#!/usr/bin/env python
"""Offline benchmark: prepare the packaged text tasks, fine-tune the MiniLM zoo, run every method, write the table.

    python benchmarks/benchmark.py --preset quick          # 4 tasks (the README's main job)
    python benchmarks/benchmark.py --preset full           # all 8 tasks
    python benchmarks/benchmark.py --preset ci             # tiny end-to-end check (the test suite runs it)
    python benchmarks/benchmark.py --preset vision         # packaged ImageNet MobileNetV2 on 4 image tasks, 32×32
    python benchmarks/benchmark.py --preset vision64       # the same at 64×64 (its own zoo)
    python benchmarks/benchmark.py --methods surgery_ta    # re-run one row, keep the rest of the table
    python benchmarks/benchmark.py --methods concrete_ta_kl_lrsel --grid lr=0.01,0.1 --extend 3
                                                        # a row's rate chosen without labels over this grid,
                                                        # followed past a kept edge (as `adamerge sweep` does)

Writes runs/benchmark/<preset>/results.{md,json}. Everything is cached under .cache/ and reused.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from adamerge import MergeInputError, parse_grid, quiet_libraries  # noqa: E402
from benchmarks.run import METHOD_GRID, PRESETS, check_overrides, provenance, regrid, results_dir, run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument(
        "--methods",
        nargs="*",
        choices=sorted(METHOD_GRID),
        help="re-run only these rows of the grid (others are kept from an earlier run); none: only the reference rows",
    )
    p.add_argument("--no-lora", action="store_true", help="skip (keep) the LoRA section")
    p.add_argument(
        "--lora-methods",
        nargs="+",
        choices=sorted(METHOD_GRID),
        metavar="KEY",
        help="the LoRA section's rows (default: the preset's)",
    )
    p.add_argument("--no-pairs", action="store_true", help="skip (keep) the two-task table")
    p.add_argument("--fresh", action="store_true", help="start a new table instead of updating an earlier one")
    p.add_argument("--steps", type=int, help="override the preset's adaptation steps")
    p.add_argument(
        "--samples-per-task",
        type=int,
        metavar="N",
        help="override the preset's unlabeled rows per task in each adaptation step",
    )
    p.add_argument(
        "--zoo",
        choices=["own", "frozen", "frozen-adabn"],
        default="own",
        help="zoo protocol: heads trained with their bodies (own) or linear-probe heads fixed before "
        "fine-tuning (frozen, the papers' setting; frozen-adabn, vision presets: each probe fitted "
        "under its task's own BatchNorm statistics)",
    )
    p.add_argument(
        "--head-pooler",
        action="store_true",
        help="each task's head keeps its fine-tune's pooler (heads: {pooler: true}); every row, the "
        "reference rows too; a table of its own (<preset>...-pooler)",
    )
    p.add_argument(
        "--batchnorm-statistics",
        choices=["batch", "task"],
        help="BatchNorm backbones (vision presets): one set of statistics for every task (batch, the "
        "default) or each task its own (task; a table of its own, <preset>...-bn-task)",
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="every re-run row that trains with a label-free selector sweeps these values instead of its "
        "own (one training per value, the best selection score kept; repeatable: every combination)",
    )
    p.add_argument(
        "--extend",
        type=int,
        metavar="N",
        help="while such a row's kept value is the largest or smallest tried, train the next one on the "
        "grid's own spacing, at most N more (one swept setting)",
    )
    p.add_argument("--inductive-only", action="store_true", help="skip the transductive column (half the time)")
    p.add_argument("--work", type=Path, default=Path(".cache"), help="cache of wheels, data and zoo")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    args = p.parse_args()
    grid = None
    if args.grid:
        try:
            grid = parse_grid(args.grid, example="lr=1e-3,1e-2", prefix="")  # rows take method arguments
        except MergeInputError as err:
            p.error(str(err))
    try:  # a row the grid cannot apply to, or an override below 1, is refused here, before any data or zoo is made
        check_overrides(args.steps, args.samples_per_task)
        regrid(PRESETS[args.preset].methods if args.methods is None else args.methods, grid, args.extend)
    except ValueError as err:
        p.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    result = run(
        args.preset,
        work=args.work,
        out=args.out,
        methods=args.methods,
        steps=args.steps,
        fresh=args.fresh,
        samples_per_task=args.samples_per_task,
        lora=not args.no_lora,
        zoo_protocol=args.zoo,
        transductive=not args.inductive_only,
        pairs=not args.no_pairs,
        head_pooler=args.head_pooler,
        batchnorm_statistics=args.batchnorm_statistics,
        grid=grid,
        extend=args.extend,
        lora_methods=args.lora_methods,
        provenance=provenance(sys.argv[1:]),
    )
    target = results_dir(
        args.out,
        args.preset,
        args.zoo,
        args.head_pooler,
        args.batchnorm_statistics or PRESETS[args.preset].batchnorm_statistics,
    )
    print((target / "results.md").read_text())  # the table is this script's output
    del result


if __name__ == "__main__":
    main()
