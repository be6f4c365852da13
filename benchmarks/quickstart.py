"""The main job: adamerge's own use on the packaged default, in minutes on a laptop CPU.

1. prepare four real text tasks from packages (cached in ``.cache/data``, shared with the benchmark);
2. fine-tune a small zoo of the packaged all-MiniLM-L6-v2 (one quick fine-tune per task, cached);
3. ``adamerge fit`` with ``configs/benchmark/quickstart.yaml``: layer-wise coefficients over the tasks' TSV-M pieces and
   tuned heads learned from the experts on *unlabeled* rows, progress in steps, W&B offline (per-task objective,
   coefficient heatmap), the step to export chosen without labels, the flattened checkpoint exported;
4. score the export (loaded with stock ``transformers``) against Task Arithmetic and the individual fine-tunes on
   each task's labelled test rows, print a table and where everything is.

Everything of one run lives in ``runs/quickstart/<time>/``: ``config.yaml``, ``coefficients.png``, ``wandb/``,
``export/``, ``results.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "quickstart.yaml"


@dataclass
class Settings:
    tasks: tuple[str, ...] = ("polarity", "question", "spam", "language")
    max_train: int = 480  # fine-tuning rows per task (the zoo): 2 epochs of 30 steps of 16 rows, lr 1e-4
    ft_epochs: int = 2
    ft_batch_size: int = 16
    ft_lr: float = 1e-4
    max_length: int = 32
    max_test: int = 200  # labelled rows per task for the final table
    steps: int | None = None  # None: the config's trainer.max_steps


def run(
    work: Path = Path(".cache"),
    out: Path = Path("runs/quickstart"),
    settings: Settings | None = None,
    extra_args: list[str] | None = None,
    zoo: Path | None = None,
) -> dict:
    """Run the main job; returns the scores and paths (also written to ``<run dir>/results.json``).

    ``work``: cache of wheels and data; ``zoo``: where the fine-tunes are cached (default
    ``work/quickstart-zoo-<rows>x<epochs>-len<length>``);
    ``extra_args``: more ``adamerge fit`` arguments (e.g. ``["--trainer.accelerator", "cpu"]``)."""
    import torch

    from adamerge import METHODS, TaskData, cli_main, input_builder, load_task_model, score
    from benchmarks.run import Evaluator, individual_rows
    from benchmarks.tasks import prepare
    from benchmarks.zoo import build_base, finetune

    s = settings or Settings()
    t0 = time.time()
    run_dir = out / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    # the zoo's directory names its settings, so changed settings never reuse fine-tunes made with others
    data_dir = work / "data"
    zoo = zoo or work / f"quickstart-zoo-{s.max_train}x{s.ft_epochs}-len{s.max_length}"
    log.info("1/4 data: %s", ", ".join(s.tasks))
    prepare(list(s.tasks), data_dir, work / "wheels")
    log.info("2/4 zoo: one fine-tune of all-MiniLM-L6-v2 per task (cached in %s)", zoo)
    base = build_base(zoo)
    paths = {
        t: str(
            finetune(
                t,
                data_dir,
                zoo,
                epochs=s.ft_epochs,
                batch_size=s.ft_batch_size,
                lr=s.ft_lr,
                max_length=s.max_length,
                max_train=s.max_train,
            )
        )
        for t in s.tasks
    }
    t_zoo = time.time() - t0

    log.info("3/4 adamerge fit --config %s", CONFIG)
    export = run_dir / "export"
    args = [
        "fit",
        "--config",
        str(CONFIG),
        "--model.init_args.base",
        str(base),
        "--model.init_args.models",
        json.dumps(paths),
        "--data.tasks",
        json.dumps({t: {"path": str(data_dir / t), "split": "unlabeled"} for t in s.tasks}),
        "--data.max_length",
        str(s.max_length),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--export.output_dir",
        str(export),
    ]
    if s.steps is not None:
        args += ["--trainer.max_steps", str(s.steps)]
    import wandb

    if wandb.run is not None:  # a run left open in this process would be reused, its files kept elsewhere
        wandb.finish()
    t1 = time.time()
    cli_main(args + list(extra_args or []))
    if wandb.run is not None:
        wandb.finish()  # flush the offline run now, so `wandb sync` sees it complete
    t_fit = time.time() - t1

    log.info("4/4 scoring on %d labelled test rows per task", s.max_test)
    inputs = input_builder({t: TaskData(str(data_dir / t)) for t in s.tasks}, str(base), s.max_length)
    evaluator = Evaluator(data_dir, list(s.tasks), inputs, s.max_test)
    # the reference rows read the heads as the merge does (the config's ``heads`` options, e.g. each head with its
    # fine-tune's own pooler), so the table compares merges, not head settings
    ta = METHODS["task_arithmetic"](str(base), paths, scale=0.3, heads=config_heads())
    ref = individual_rows(ta, evaluator, list(s.tasks))
    scores = {
        "individual": ref["individual"]["inductive"],
        "pretrained": ref["pretrained"]["inductive"],
        "task_arithmetic": evaluator(ta),
    }
    del ta
    merged = {}
    for task in s.tasks:  # the export as a user serves it: stock transformers, no adamerge module
        model = load_task_model(str(export), task)
        rows, labels, n_cls = evaluator.sets[task]
        merged[task] = score(lambda b, m=model: m(**b).logits, rows, labels, n_cls, evaluator.inputs, batch_size=128)
    scores["adamerge"] = merged
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    result = {
        "settings": asdict(s),
        "scores": scores,
        "run_dir": str(run_dir),
        "export": str(export),
        "wandb_run": str(wandb_runs[-1]) if wandb_runs else None,
        "seconds": {
            "data_and_zoo": round(t_zoo, 1),
            "fit_and_export": round(t_fit, 1),
            "total": round(time.time() - t0, 1),
        },
        "hardware": f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
    }
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def config_heads() -> dict | None:
    """The ``model.init_args.heads`` options of ``configs/benchmark/quickstart.yaml`` (None when it sets none)."""
    import yaml

    return (yaml.safe_load(CONFIG.read_text())["model"].get("init_args") or {}).get("heads")


def report(result: dict) -> str:
    """The table and the paths, as the main job prints them."""
    sc, tasks = result["scores"], list(result["scores"]["individual"])
    rows = [
        ("individual", "Individual fine-tunes (one model per task)"),
        ("pretrained", "Pretrained encoder + heads"),
        ("task_arithmetic", "Task Arithmetic (λ=0.3)"),
        ("adamerge", "adamerge: one merged model (this run)"),
    ]
    lines = ["| method | **average** | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for key, label in rows:
        avg = 100 * sum(sc[key][t]["accuracy"] for t in tasks) / len(tasks)
        lines.append(
            f"| {label} | **{avg:.1f}** | " + " | ".join(f"{100 * sc[key][t]['accuracy']:.1f}" for t in tasks) + " |"
        )
    sec = result["seconds"]
    lines += [
        "",
        "Accuracy (%) on each task's labelled test rows; adamerge learned its merge from unlabeled rows only.",
        f"Time: {sec['total']:.0f} s (data + zoo {sec['data_and_zoo']:.0f} s, fit + export "
        f"{sec['fit_and_export']:.0f} s), {result['hardware']}.",
        "",
        f"  export (stock transformers loads it):  {result['export']}",
        f"  run directory (results.json):         {result['run_dir']}",
    ]
    if result["wandb_run"]:
        lines += [
            f"  W&B offline run (config, heatmap):    {result['wandb_run']}",
            f"  upload it later with:                 wandb sync {result['wandb_run']}",
        ]
    lines += [
        "  next: README.md 'Choosing a method and an objective'; the full benchmark is "
        "`python benchmarks/benchmark.py --preset quick`"
    ]
    return "\n".join(lines)
