"""Run the offline benchmark: data → zoo → every method → one results table.

Protocols: *inductive* adapts on each task's ``unlabeled`` split and reports on ``test``; *transductive* (the
papers' protocol) adapts on the ``test`` inputs themselves. Data-free methods do not adapt, so both columns agree.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.func import functional_call

from adamerge.bench.tasks import TASKS, prepare
from adamerge.bench.zoo import build_base, finetune
from adamerge.data import TaskData, UnlabeledDataModule, pad_batch, tokenize
from adamerge.evaluate import score
from adamerge.methods import METHODS, MergeModule, TaskVectorPrep

log = logging.getLogger(__name__)


@dataclass
class Preset:
    tasks: list[str]
    steps: int = 500
    samples_per_task: int = 16
    max_length: int = 64
    max_train: int = 2000
    max_unlabeled: int = 1000
    max_test: int = 1000
    ft_epochs: int = 2
    methods: list[str] = field(default_factory=lambda: list(METHOD_GRID))


PRESETS = {
    "ci": Preset(["polarity", "spam"], steps=3, samples_per_task=4, max_length=32, max_train=96, max_unlabeled=24,
                 max_test=48, ft_epochs=1, methods=["task_arithmetic", "ties", "adamerging_layer"]),
    "quick": Preset(["polarity", "question", "spam", "language"], steps=200),
    "full": Preset(list(TASKS), steps=200),
}

# label, registry name, constructor arguments. A new method joins the table with one line here.
METHOD_GRID: dict[str, tuple[str, str, dict]] = {
    "average": ("Weight average", "average", {}),
    "task_arithmetic": ("Task Arithmetic (λ=0.3)", "task_arithmetic", {"scale": 0.3}),
    "ties": ("TIES (k=0.2, λ=1)", "ties", {"density": 0.2, "scale": 1.0}),
    "dare_ta": ("DARE+TA (p=0.5, λ=0.3)", "task_arithmetic", {"scale": 0.3, "prep": TaskVectorPrep(dare_rate=0.5)}),
    "m3": ("M3 (Dirichlet α=0.5, 1 draw)", "m3", {"alpha": 0.5, "seed": 0}),
    "m3_best": ("M3 (best of 8 by entropy)", "m3", {"alpha": 0.5, "seed": 0, "candidates": 8}),
    "adamerging_task": ("AdaMerging task-wise", "adamerging", {"granularity": "task"}),
    "adamerging_layer": ("AdaMerging layer-wise", "adamerging", {"granularity": "layer"}),
    "adamerging_pp_layer": ("AdaMerging++ layer-wise", "adamerging",
                            {"granularity": "layer", "prep": TaskVectorPrep(ties_density=0.2)}),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Evaluator:
    """Tokenized test sets, scored against any backbone parameters with each task's own head."""

    def __init__(self, data_dir: Path, tasks: list[str], tokenizer, max_length: int, max_test: int) -> None:
        import datasets

        self.sets = {}
        for t in tasks:
            ds = datasets.load_from_disk(str(data_dir / t))["test"]
            ds = ds.select(range(min(max_test, len(ds))))
            self.sets[t] = (tokenize(tokenizer, ds, TaskData(str(data_dir / t)), max_length),
                            torch.tensor(ds["label"]), len(ds.features["label"].names))
        self.pad = tokenizer.pad_token_id or 0

    @torch.no_grad()
    def __call__(self, merged, params) -> dict[str, dict[str, float]]:
        out = {}
        for task, (rows, labels, n_cls) in self.sets.items():
            def logits(batch, task=task):
                feats = functional_call(merged.backbone, params, args=(), kwargs=batch)
                return merged.head_logits(task, feats, batch)

            out[task] = score(logits, rows, labels, n_cls, self.pad, batch_size=128)
        return out


def adapt(module: MergeModule, data_dir: Path, tasks: list[str], split: str, preset: Preset, seed: int) -> None:
    """Train a method's coefficients/masks on ``split`` of every task (no-op for data-free methods)."""
    dm = UnlabeledDataModule({t: TaskData(str(data_dir / t), split=split) for t in tasks},
                             tokenizer=module.hparams.base, samples_per_task=preset.samples_per_task,
                             max_length=preset.max_length, seed=seed)
    if getattr(module, "needs_data", False):
        module.select(dm)
    if not module.trainable:
        return
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_steps=preset.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="auto", devices=1)
    trainer.fit(module, datamodule=dm)


def run(preset_name: str = "quick", work: Path = Path(".cache"), out: Path = Path("runs/benchmark"),
        methods: list[str] | None = None, steps: int | None = None, seed: int = 0) -> dict:
    """Build everything the preset needs (skipping what exists) and write ``out/<preset>/results.{json,md}``."""
    from transformers import AutoTokenizer

    preset = PRESETS[preset_name]
    if steps is not None:
        preset.steps = steps
    methods = methods or preset.methods
    root = work / ("ci" if preset_name == "ci" else "")
    data_dir, zoo = root / "data", root / "zoo"
    t0 = time.time()
    card = prepare(preset.tasks, data_dir, work / "wheels", seed=seed, max_train=preset.max_train,
                   max_unlabeled=preset.max_unlabeled, max_test=preset.max_test)
    base = str(build_base(zoo))
    paths = {t: str(finetune(t, data_dir, zoo, epochs=preset.ft_epochs, max_length=preset.max_length))
             for t in preset.tasks}
    zoo_seconds = time.time() - t0
    tok = AutoTokenizer.from_pretrained(base)
    evaluator = Evaluator(data_dir, preset.tasks, tok, preset.max_length, preset.max_test)

    rows: dict[str, dict] = {}
    ref = METHODS["task_arithmetic"](base, paths)
    rows["individual"] = {"label": "Individual fine-tuned models", "inductive": {
        t: evaluator(ref.merged, ref.merged.merged_params(ref.merged.one_hot(t)))[t] for t in preset.tasks}}
    zero = torch.zeros(len(preset.tasks), len(ref.merged.param_names))
    rows["pretrained"] = {"label": "Pretrained encoder + task heads",
                          "inductive": evaluator(ref.merged, ref.merged.merged_params(zero))}
    del ref
    for key in methods:
        label, name, kwargs = METHOD_GRID[key]
        row = {"label": label}
        for protocol, split in (("inductive", "unlabeled"), ("transductive", "test")):
            tm = time.time()
            module = METHODS[name](base, paths, **kwargs)
            adapts = module.trainable or getattr(module, "needs_data", False)
            if protocol == "transductive" and not adapts:
                break
            adapt(module, data_dir, preset.tasks, split, preset, seed)
            row[f"{protocol}_seconds"] = round(time.time() - tm, 1)
            row[protocol] = evaluator(module.merged, module.final_merged_params())
            if protocol == "inductive":
                row["coefficients"] = module.coefficient_matrix().mean(dim=1).tolist()
            log.info("%s %s: %.4f", label, protocol, _avg(row[protocol]))
            del module
        rows[key] = row
    result = {"preset": preset_name, "preset_config": {k: v for k, v in vars(preset).items()},
              "tasks": preset.tasks, "rows": rows, "data_card": card, "zoo_seconds": round(zoo_seconds, 1),
              "total_seconds": round(time.time() - t0, 1), "peak_rss_mib": round(peak_rss_mib()),
              "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}"}
    target = out / preset_name
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (target / "results.md").write_text(render(result) + "\n")
    return result


def _avg(per_task: dict, key: str = "accuracy") -> float:
    return sum(v[key] for v in per_task.values()) / len(per_task)


def render(result: dict) -> str:
    tasks = result["tasks"]
    head = ["method", *tasks, "avg (inductive)", "avg macro-F1", "avg (transductive)", "adapt s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"].values():
        ind = row["inductive"]
        tr = row.get("transductive")
        cells = [row["label"], *(f"{100 * ind[t]['accuracy']:.1f}" for t in tasks), f"**{100 * _avg(ind):.1f}**",
                 f"{100 * _avg(ind, 'macro_f1'):.1f}", f"{100 * _avg(tr):.1f}" if tr else "(same)",
                 str(row.get("inductive_seconds", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    c = result["preset_config"]
    lines += ["", f"Preset `{result['preset']}`: {len(tasks)} tasks, {c['steps']} adaptation steps, "
                  f"{c['samples_per_task']} samples/task/step, max length {c['max_length']}. "
                  f"Accuracy in % on each task's test split with its own head. Total {result['total_seconds']} s "
                  f"(data + zoo {result['zoo_seconds']} s), peak RSS {result['peak_rss_mib']} MiB, {result['hardware']}."]
    return "\n".join(lines)
