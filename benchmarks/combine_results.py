#!/usr/bin/env python
"""Combine two benchmark tables of the same zoo: the rows of UPDATE replace or join those of BASE.

    python benchmarks/combine_results.py BASE/results.json UPDATE/results.json --out DIR [--drop ROW ...]

For re-runs of some rows made in another process or on another machine (e.g. after a fix). It refuses unless both
tables have the same preset, protocol, tasks, steps and the same individual and pretrained scores to the last digit
(the zoo rebuilt bit for bit), so rows from two different zoos never share a table. ``--drop`` removes rows of BASE
that were not re-run and must not be shown. Writes DIR/results.{json,md} with the benchmark's own renderer; the json
records both sources.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from benchmarks.run import REFERENCE_ROWS, write_results  # noqa: E402


def combine(base: dict, update: dict, drop: list[str]) -> dict:
    for key in ("preset", "zoo_protocol", "tasks"):
        if base.get(key) != update.get(key):
            raise SystemExit(f"error: {key} differs: {base.get(key)!r} vs {update.get(key)!r}")
    if base["preset_config"]["steps"] != update["preset_config"]["steps"]:
        raise SystemExit("error: the two tables were trained for different numbers of steps")
    for ref in ("individual", "pretrained"):
        if base["rows"][ref]["inductive"] != update["rows"][ref]["inductive"]:
            raise SystemExit(f"error: the {ref} rows differ: the tables come from different zoos")
    unknown = sorted(set(drop) - set(base["rows"]))
    if unknown:
        raise SystemExit(f"error: --drop names rows that are not in the base table: {unknown}")
    rows = {k: v for k, v in base["rows"].items() if k not in drop}
    rows.update(update["rows"])
    out = {**base, "rows": rows, "runs": [*base.get("runs", []), *update.get("runs", [])]}
    out["sources"] = {
        "base": {k: base[k] for k in ("hardware", "total_seconds")},
        "update": {k: update[k] for k in ("hardware", "total_seconds")},
        "rows_from_update": sorted(set(update["rows"]) - set(REFERENCE_ROWS)),
        "dropped": sorted(drop),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path)
    p.add_argument("update", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--drop", nargs="*", default=[])
    args = p.parse_args()
    result = combine(json.loads(args.base.read_text()), json.loads(args.update.read_text()), args.drop)
    write_results(result, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
