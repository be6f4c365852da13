#!/usr/bin/env python
"""The results page and the findings page, regenerated from the committed raw results in docs/results/.

    python benchmarks/report.py                  # rewrite every generated block of docs/results.md, docs/findings.md
    python benchmarks/report.py --check          # exit 1 if that would change either page (the test suite runs it)
    python benchmarks/report.py add runs/canonical/quick-pooler/results.json --name quick-own
                                                 # a benchmark's results.json, slimmed, as docs/results/quick-own.json
    python benchmarks/report.py add ... --section lora --name lora      # its LoRA table
    python benchmarks/report.py add runs/bench_speed.json --name speed-cpu --speed

The pages are written by hand around generated blocks: a line ``<!-- table NAME [OPTION ...] -->`` and a line
``<!-- /table -->``; everything between them is replaced by the table made from docs/results/NAME.json and its
caption (command, device, date, protocol, commit). OPTION: ``rows=KEY,KEY`` (only these rows, in this order; default:
every row of ROWS, ``—`` where the run has none), ``cols=steps,seconds`` (the selected and stopped step; the wall
time of training), ``ratio=KEY`` (each row's wall time as a fraction of row KEY's), ``notitle``. Speed files render
as the speed table. No number on either page outside these blocks comes from a run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGES = [ROOT / "docs" / "results.md", ROOT / "docs" / "findings.md"]

# Every table's method rows, defined once, in this order: (key in results.json, name on the page, what it is).
ROWS: list[tuple[str, str, str]] = [
    ("individual", "Individual fine-tunes", "each task's own fine-tune (or LoRA adapter) on its task: the ceiling"),
    ("pretrained", "Pretrained + heads", "the base model with each task's head: the floor"),
    ("average", "Weight average", "data-free: the mean of the fine-tunes"),
    ("task_arithmetic", "Task Arithmetic", "data-free: base + 0.3 × Σ task vectors"),
    ("ties", "TIES", "data-free: top 20% per task, sign election, disjoint mean, λ = 1"),
    ("tsv_m", "TSV-M", "data-free: task singular vectors, decorrelated, α = 1"),
    ("iso_c", "Iso-C", "data-free: the task-arithmetic sum with a flat spectrum, α = 1"),
    ("adamerging_task", "AdaMerging task-wise", "one coefficient per task, trained on entropy (the paper's)"),
    ("adamerging_layer", "AdaMerging layer-wise", "one per task and tensor, trained on entropy (the paper's)"),
    ("adamerging_pp_layer", "AdaMerging++ layer-wise", "layer-wise over TIES-trimmed task vectors, entropy"),
    ("concrete_ta", "Concrete TA", "a learned Concrete mask over the task vectors, Task Arithmetic, entropy"),
    ("concrete_adamerging", "Concrete AdaMerging", "the mask and layer-wise coefficients, entropy"),
    (
        "tinting_tsv",
        "**Guided, over TSV-M**",
        "`adamerge init`'s recipe for full fine-tunes: layer-wise over TSV-M's pieces (init 1), tuned heads, "
        "KL to each fine-tune, the exported step chosen by agreement with the fine-tunes on held-back unlabeled rows",
    ),
    (
        "tinting_tsv_early",
        "**Guided, over TSV-M, early-stopped**",
        "the same, training stopped once that agreement has not risen by more than one held-back row for 10 scorings "
        "(100 steps)",
    ),
    (
        "tinting",
        "**Guided**",
        "`adamerge init`'s recipe for LoRA adapters and convolutional models: the same over plain task vectors "
        "(init 0.3)",
    ),
    ("wemoe", "WEMoE", "each MLP's task vectors mixed by a router per token (trained on entropy); served by adamerge"),
    ("surgery_ta", "Surgery on TA", "per-task adapters on Task Arithmetic's features (L1 to the fine-tunes)"),
    ("surgery_adamerging", "Surgery on AdaMerging", "the same on AdaMerging layer-wise"),
    ("surgery_tsv", "Surgery on TSV-M", "the same on TSV-M"),
]
ROW_NAMES = {key: name for key, name, _ in ROWS}
EXTRA_ROWS = ("tinting_tsv_early",)  # in a table only where its block names it (rows=...)
REFERENCE = ("individual", "pretrained")  # not merges: never starred
BLOCK = re.compile(r"^<!-- table (?P<spec>[^>]*?) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)

# what a slimmed row keeps (accuracies only, plus these)
KEEP = ("label", "inductive_seconds", "inductive_peak_rss_mib")
SELECTION_KEEP = ("criterion", "selected_step", "score", "history", "stopped_step", "final_step")


def slim(result: dict, section: str = "rows") -> dict:
    """One table of a benchmark's ``results.json`` (``section``: ``rows`` or ``lora``): accuracies per task, wall
    time, peak memory, the label-free selection; the run's setup and provenance."""
    cfg = result["preset_config"]
    rows = {}
    for key, row in result[section].items():
        out = {k: row[k] for k in KEEP if k in row}
        out["inductive"] = {t: round(m["accuracy"], 6) for t, m in row["inductive"].items()}
        if row.get("transductive"):
            out["transductive"] = {t: round(m["accuracy"], 6) for t, m in row["transductive"].items()}
        sel = row.get("inductive_selection")
        if sel:
            out["selection"] = {k: sel[k] for k in SELECTION_KEEP if k in sel}
        rows[key] = out
    return {
        "kind": "benchmark",
        "preset": result["preset"],
        "section": section,
        "zoo_protocol": result["zoo_protocol"],
        "head_pooler": bool(result.get("head_pooler")),
        "batchnorm_statistics": result.get("batchnorm_statistics", "batch"),
        "steps": cfg["steps"],
        "samples_per_task": cfg["samples_per_task"],
        "lora_rank": cfg.get("lora_rank") if section == "lora" else None,
        "tasks": result["tasks"],
        "hardware": result.get("hardware", "not recorded"),
        "zoo_seconds": result.get("zoo_seconds"),
        "total_seconds": result.get("total_seconds"),
        "runs": result.get("runs", []),
        "rows": rows,
        **({"refused": result["refused"]} if section == "rows" and result.get("refused") else {}),
    }


def _git_added(path: Path) -> dict:
    """Provenance of a results file written before runs recorded their own: the commit and date that committed it."""
    out = subprocess.run(
        ["git", "log", "-1", "--format=%h %as", "--", str(path)], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    return {"commit": out[0], "date": out[1]} if len(out) == 2 else {}


def add(
    source: Path,
    name: str,
    section: str,
    speed: bool,
    command: str | None,
    drop: list[str] | None = None,
    why: str | None = None,
) -> Path:
    result = json.loads(source.read_text())
    table = {"kind": "speed", "runs": [], **_speed(result)} if speed else slim(result, section)
    if drop:
        for key in drop:
            table["rows"].pop(key)
        table["dropped"] = {"rows": drop, "why": why or "not given"}
    if not table["runs"]:
        found = _git_added(source)
        if command:
            found["command"] = command
        if found:
            table["runs"] = [{**found, "recorded": "the commit that stored it; the run predates recorded provenance"}]
    target = RESULTS / f"{name}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    return target


def _speed(result) -> dict:
    """``benchmarks/bench_speed.py``'s output (a list of per-T rows, or ``{"rows": [...]}``): step time and peak
    memory per configuration."""
    rows = result["rows"] if isinstance(result, dict) else result
    keep = ("step_ms", "step_peak_mib", "device", "gpu")
    slimmed = [{cfg: {k: v[k] for k in keep if k in v} | {"T": v["T"]} for cfg, v in row.items()} for row in rows]
    kept = {k: result[k] for k in ("shape", "runs") if k in result} if isinstance(result, dict) else {}
    return {"rows": slimmed, **kept}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def best_marks(table: dict, keys: list[str], columns: list[str]) -> dict[str, set[str]]:
    """Per column, the merge rows (not the reference rows) with the highest figure as printed (ties all marked)."""
    marks: dict[str, set[str]] = {c: set() for c in columns}
    for col in columns:
        printed = {}
        for k in keys:
            row = table["rows"].get(k)
            if k in REFERENCE or row is None:
                continue
            acc = row["inductive"]
            printed[k] = float(pct(mean(acc.values()) if col == "avg" else acc[col]))
        if printed:
            top = max(printed.values())
            marks[col] = {k for k, v in printed.items() if v == top}
    return marks


def run_lines(table: dict) -> list[str]:
    """One caption line per call that wrote ``table``: its date, commit and command."""
    return [
        f"*Run {r.get('date', 'date not recorded')} at commit `{r.get('commit', 'not recorded')}`"
        + (f" ({r['recorded']})" if r.get("recorded") else "")
        + (f": `{r['command']}`" if r.get("command") else "")
        + ".*"
        for r in table.get("runs") or [{}]
    ]


def caption(table: dict) -> str:
    """Protocol, device, date, commit and command of a benchmark table."""
    zoo = {"own": "own-head zoo (heads trained with their bodies)", "frozen": "frozen-head zoo (the papers' protocol)"}
    parts = [
        f"`{table['preset']}` preset, {len(table['tasks'])} tasks",
        zoo.get(table["zoo_protocol"], f"{table['zoo_protocol']} zoo"),
    ]
    if table.get("lora_rank"):
        parts.append(f"PEFT LoRA adapters (r = {table['lora_rank']})")
    if table["head_pooler"]:
        parts.append("every row with each fine-tune's pooler in its head")
    if table.get("batchnorm_statistics") == "task":
        parts.append("per-task BatchNorm statistics")
    parts.append(
        f"{table['steps']} steps of {table['samples_per_task']} unlabeled rows per task, inductive "
        "(trained on the unlabeled split, scored on the test split)"
    )
    device = table.get("hardware", "not recorded")
    lines = ["*" + "; ".join(parts) + f". Device: {device}.*", *run_lines(table)]
    if table.get("dropped"):
        d = table["dropped"]
        lines.append(f"*Left out of this run's table: {', '.join(d['rows'])} — {d['why']}.*")
    for key, why in table.get("refused", {}).items():  # the method's own error, its pattern lists elided
        why = re.sub(r"\[(?:'[^']*'(?:, )?)+\]", "[…]", why)  # a list of quoted patterns, brackets inside too
        lines.append(f"*{ROW_NAMES.get(key, key)} refused this model: {why}.*")
    return "  \n".join(lines)


def benchmark_table(table: dict, options: dict[str, str]) -> list[str]:
    tasks = table["tasks"]
    keys = options["rows"].split(",") if "rows" in options else [k for k, _, _ in ROWS if k not in EXTRA_ROWS]
    unknown = [k for k in keys if k not in ROW_NAMES and k not in table["rows"]]
    if unknown:
        raise SystemExit(f"report: rows {unknown} are neither defined in ROWS nor in docs/results/{options['name']}")
    names = {k: ROW_NAMES.get(k) or table["rows"][k]["label"] for k in keys}
    extra = [c for c in options.get("cols", "").split(",") if c]
    columns = ["avg", *tasks]
    marks = best_marks(table, keys, columns)
    ratio_of = options.get("ratio")
    head = ["method", "**avg**", *tasks]
    if "steps" in extra:
        head += ["selected step", "stopped at"]
    if "seconds" in extra:
        head += ["training s"]
    if ratio_of:
        head += [f"time / {names.get(ratio_of, ratio_of).strip('*')}"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    base_seconds = table["rows"].get(ratio_of, {}).get("inductive_seconds") if ratio_of else None
    for k in keys:
        row = table["rows"].get(k)
        if row is None:
            lines.append("| " + " | ".join([names[k], *("—" for _ in head[1:])]) + " |")
            continue
        acc = row["inductive"]
        starred = {col for col, keys_ in marks.items() if k in keys_}
        cells = [
            names[k],
            f"**{pct(mean(acc.values()))}**" + (" ★" if "avg" in starred else ""),
            *(pct(acc[t]) + (" ★" if t in starred else "") for t in tasks),
        ]
        sel = row.get("selection", {})
        if "steps" in extra:
            stopped = sel.get("stopped_step")
            ran = f"ran to {sel['final_step']}" if "final_step" in sel else "—"
            cells += [str(sel.get("selected_step", "—")), str(stopped) if stopped is not None else ran]
        if "seconds" in extra:
            cells += [f"{row['inductive_seconds']:.0f}" if "inductive_seconds" in row else "—"]
        if ratio_of:
            s = row.get("inductive_seconds")
            cells += [f"{s / base_seconds:.2f}" if s and base_seconds else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return [caption(table), "", *lines]


def speed_table(table: dict, options: dict[str, str]) -> list[str]:
    """Per T: adamerge's step against a plain forward/backward (b/a), FusionBench's against adamerge's (c/b), and
    adamerge's leanest setting's peak memory against FusionBench's."""
    head = ["T", "a ms", "b ms", "c ms", "**b/a**", "**c/b**", "b-lean MiB", "c MiB", "**b-lean/c**"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    device = None
    for row in table["rows"]:
        a, b, c, lean = row.get("a"), row.get("b"), row.get("c"), row.get("b-lean")
        some = next(v for v in row.values())
        device = some.get("gpu") or some.get("device")
        if not (a and b and c):
            continue
        cells = [
            str(some["T"]),
            f"{a['step_ms']:.1f}",
            f"{b['step_ms']:.1f}",
            f"{c['step_ms']:.1f}",
            f"{b['step_ms'] / a['step_ms']:.2f}",
            f"{c['step_ms'] / b['step_ms']:.2f}",
            f"{lean['step_peak_mib']:.0f}" if lean else "—",
            f"{c['step_peak_mib']:.0f}",
            f"{lean['step_peak_mib'] / c['step_peak_mib']:.2f}" if lean else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return ["  \n".join([f"*Device: {device}.*", *run_lines(table)]), "", *lines]


def rows_table() -> list[str]:
    lines = ["| row | what it is | key |", "|---|---|---|"]
    lines += [f"| {name} | {what} | `{key}` |" for key, name, what in ROWS]
    return lines


def render_block(spec: str) -> str:
    name, *opts = spec.split()
    options = dict(o.split("=", 1) if "=" in o else (o, "") for o in opts)
    options["name"] = name
    if name == "rows":
        body = rows_table()
    else:
        table = json.loads((RESULTS / f"{name}.json").read_text())
        body = speed_table(table, options) if table["kind"] == "speed" else benchmark_table(table, options)
    return "\n".join(body) + "\n"


def render(text: str) -> str:
    """``text`` with every generated block made anew."""
    return BLOCK.sub(lambda m: f"<!-- table {m['spec']} -->\n{render_block(m['spec'])}<!-- /table -->", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if regenerating would change a page")
    sub = p.add_subparsers(dest="cmd")
    a = sub.add_parser("add", help="store one table of a run's raw results under docs/results/")
    a.add_argument("source", type=Path)
    a.add_argument("--name", required=True)
    a.add_argument("--section", default="rows", choices=["rows", "lora"])
    a.add_argument("--speed", action="store_true", help="a benchmarks/bench_speed.py result")
    a.add_argument("--command", help="the command of a run that predates recorded provenance")
    a.add_argument("--drop", nargs="+", metavar="KEY", help="rows left out of the stored table (say --why)")
    a.add_argument("--why", help="why --drop's rows are left out (the caption says it)")
    args = p.parse_args(argv)
    if args.cmd == "add":
        print(add(args.source, args.name, args.section, args.speed, args.command, args.drop, args.why))
        return 0
    stale = []
    for page in PAGES:
        old = page.read_text()
        new = render(old)
        if new != old:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        names = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in stale]
        print("stale: " + ", ".join(names) + " (run python benchmarks/report.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
