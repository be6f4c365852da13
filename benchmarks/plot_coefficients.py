"""Layer-wise merge coefficients, block by block (embeddings, each layer, ...): one panel per source, one line per
task. A source is an export (its ``merge_manifest.json``: ``coefficients.effective``, the mean over each block's
tensors as the model card's table) or a benchmark row, ``RESULTS.json#row`` (the row's ``coefficient_blocks``, the
same means, recorded by ``benchmarks/benchmark.py``). Prints the same numbers as text.

    python benchmarks/plot_coefficients.py runs/x/checkpoints/adamerging_layer-inductive \\
        runs/x/quick/results.json#adamerging_layer_pl_lrsel --out coefficients.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first


def block_means(source: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(tasks, block names, [task][block] mean coefficient) of an export or a benchmark row (``RESULTS.json#row``)."""
    from adamerge import coefficient_table

    if "#" in source:
        path, key = source.rsplit("#", 1)
        rows = json.loads(Path(path).read_text())["rows"]
        if key not in rows or "coefficient_blocks" not in rows[key]:
            raise SystemExit(f"{path}: no row {key!r} with coefficient_blocks (rows: {sorted(rows)})")
        blocks = rows[key]["coefficient_blocks"]
        return blocks["tasks"], blocks["blocks"], blocks["values"]
    export = Path(source)
    manifest_path = export / "merge_manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{export}: no merge_manifest.json (not an adamerge export)")
    coefficients = json.loads(manifest_path.read_text())["coefficients"]
    cols, rows = coefficient_table(coefficients)
    return list(coefficients["tasks"]), cols, rows


def short(block: str) -> str:
    """``encoder.layer.3`` → ``layer.3``: a column title of the printed table."""
    parts = block.split(".")
    return ".".join(parts[-2:])[:10] if parts[-1].isdigit() else block[:10]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", help="export directories or RESULTS.json#row")
    ap.add_argument("--labels", nargs="*", help="a panel title per source (default: the folder or row names)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    labels = args.labels or [p.rsplit("#", 1)[-1] if "#" in p else Path(p).name for p in args.exports]
    if len(labels) != len(args.exports):
        raise SystemExit(f"--labels: {len(labels)} given for {len(args.exports)} exports")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.exports), figsize=(5.5 * len(args.exports), 3.6), sharey=True, squeeze=False)
    for ax, export, label in zip(axes[0], args.exports, labels):
        tasks, cols, rows = block_means(export)
        print(f"{label} ({export}):")
        print("  block        " + " ".join(f"{short(c):>10}" for c in cols))
        for task, row in zip(tasks, rows):
            ax.plot(range(len(cols)), row, marker="o", ms=3, label=task)
            print(f"  {task:<12} " + " ".join(f"{v:10.3f}" for v in row))
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.axhline(0.3, color="grey", lw=0.6, ls="--")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean coefficient λ in the block")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
