"""Run the offline benchmark: data → zoo → every method → one results table.

Protocols: *inductive* adapts on each task's ``unlabeled`` split and reports on ``test``; *transductive* (the
papers' protocol) adapts on the ``test`` inputs themselves. Data-free methods do not adapt, so both columns agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from adamerge import (
    METHODS,
    LRSchedule,
    MergeInputError,
    MergeModule,
    SelectionEarlyStopping,
    SelectStep,
    StepProgress,
    TaskData,
    UnlabeledDataModule,
    at_edge,
    input_builder,
    score,
)
from benchmarks.tasks import TASKS, prepare
from benchmarks.vision import IMAGE_SIZE
from benchmarks.zoo import BATCHNORM_PROTOCOLS, build_base, finetune

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One method row of the table: a registry method with arguments; ``on`` names the row whose exported merge
    it starts from (Surgery)."""

    label: str
    method: str
    kwargs: dict = field(default_factory=dict)
    on: str | None = None
    select: str | None = None  # label-free step selection criterion (SelectStep on held-back unlabeled rows)
    # label-free hyperparameter choice: one training per value (e.g. {"lr": [1e-3, 1e-2]}; several keys: every
    # combination), the row keeps the run whose selected step scores best by ``select`` on the same held-back rows —
    # the step selection over the union of the runs' scored steps (ties: the earlier value)
    sweep: dict[str, list] | None = None
    # while the kept value of a one-key sweep is the largest or smallest tried (and no other scored the same), train
    # the next value on the grid's own spacing, at most this many more times (``adamerge sweep --extend``'s rule)
    extend: int = 0
    schedule: dict | None = None  # the learning-rate schedule of training (LRSchedule's arguments; None: constant)
    early_stop: dict | None = None  # SelectionEarlyStopping's arguments (with ``select``): stop on its plateau


# what a row's results keep of its label-free selection (SelectStep.result, plus where early stopping stopped)
SELECTION_FIELDS = ("criterion", "selected_step", "score", "history", "per_task", "stopped_step", "final_step")
GRID_FILE = Path(__file__).with_name("grid.yaml")


def load_grid(path: Path = GRID_FILE) -> dict[str, Row]:
    """The method grid as data: ``path``'s entries (``key`` plus :class:`Row`'s fields) in the table's order; an
    unknown field, a missing one or a key used twice is refused, naming the entry."""
    import yaml

    fields = {f.name for f in dataclasses.fields(Row)}
    grid: dict[str, Row] = {}
    for i, entry in enumerate(yaml.safe_load(path.read_text())):
        entry = dict(entry)
        key = entry.pop("key", None)
        where = f"{path.name}: entry {i + 1} ({key or 'no key'})"
        if key is None or key in grid:
            raise ValueError(f"{where}: every entry needs a key of its own")
        if True in entry:  # YAML 1.1 reads a bare ``on`` key as true
            raise ValueError(f'{where}: write the field "on" quoted')
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: key, {', '.join(sorted(fields))}")
        missing = sorted({"label", "method"} - set(entry))
        if missing:
            raise ValueError(f"{where}: no {missing[0]}")
        grid[key] = Row(**entry)
    return grid


METHOD_GRID: dict[str, Row] = load_grid()


def variant(key: str, label: str, kwargs: dict | None = None, drop: tuple[str, ...] = (), **fields) -> Row:
    """Row ``key`` of the grid with ``kwargs`` merged into its own (``drop``: keys taken out), other fields
    (``select``, ``sweep``, ``schedule``, ...) replaced: an ad-hoc row from Python; the copy never shares a kwargs
    dict with the row it came from."""
    base = METHOD_GRID[key]
    own = {k: v for k, v in base.kwargs.items() if k not in drop}
    return replace(base, kwargs={**own, **(kwargs or {})}, label=label, **fields)


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
    surgery_steps: int = 200
    holdout: int = 64  # unlabeled rows per task held back for label-free step selection (rows with ``select``)
    select_every: int = 10
    pairs: bool = False  # also the two-task table (every pair: TA, average, M3)
    lora_rank: int = 0  # > 0: also a LoRA zoo (PEFT, this rank) and its merges
    lora_methods: list[str] = field(default_factory=lambda: ["task_arithmetic", "adamerging_layer"])
    methods: list[str] = field(default_factory=lambda: list(METHOD_GRID))
    task_type: str = "seq_cls"  # image_cls: the vision benchmark (benchmarks.vision)
    bn_batches: int = 16  # BatchNorm backbones: steps of unlabeled rows to re-estimate a merge's statistics on
    image_size: int = IMAGE_SIZE  # image tasks: the side every image is resized to (a zoo per size, same data)
    # BatchNorm backbones: one set of statistics for every task ("batch") or each task its own ("task"), in training
    # and in the export (MergeModule.batchnorm_statistics)
    batchnorm_statistics: str = "batch"

    @property
    def image(self) -> bool:
        return self.task_type != "seq_cls"

    def task_data(self, path: str, split: str) -> TaskData:
        return TaskData(path, split=split, image_column="image" if self.image else None)


PRESETS = {
    "ci": Preset(
        ["polarity", "spam"],
        steps=3,
        samples_per_task=4,
        max_length=32,
        max_train=96,
        max_unlabeled=24,
        max_test=48,
        ft_epochs=1,
        surgery_steps=3,
        holdout=8,
        select_every=1,
        methods=["task_arithmetic", "ties", "adamerging_layer", "tinting", "surgery_adamerging"],
    ),
    "quick": Preset(["polarity", "question", "spam", "language"], steps=100, pairs=True, lora_rank=8),
    "full": Preset(list(TASKS), steps=100),
    "vision": Preset(
        ["mnist", "digits", "animals", "fashion"],
        steps=100,
        task_type="image_cls",
        surgery_steps=100,
        methods=[
            "task_arithmetic",
            "ties",
            "tsv_m",
            "adamerging_task",
            "adamerging_layer",
            "adamerging_pp_layer",
            "adamerging_layer_kl",
            "tinting",
            "concrete_ta",
            "concrete_adamerging",
            "surgery_ta",
            "surgery_adamerging",
        ],
    ),
}
# the same benchmark at 64×64: MobileNetV2's last feature map is 2×2 instead of 1×1 (its own zoo, the same data)
PRESETS["vision64"] = replace(PRESETS["vision"], image_size=64, methods=list(PRESETS["vision"].methods))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Peak resident memory (MiB) of this process while the ``with`` block runs, sampled every 20 ms."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, 0.0

    @staticmethod
    def current() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRSS:
        import threading

        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


class Evaluator:
    """Test sets (tokenized text, or images processed per batch), scored against any backbone parameters with each
    task's own head."""

    def __init__(self, data_dir: Path, tasks: list[str], inputs, max_test: int) -> None:
        import datasets

        self.inputs, self.sets = inputs, {}  # inputs: what adamerge.input_builder returns
        for t in tasks:
            ds = datasets.load_from_disk(str(data_dir / t))["test"]
            ds = ds.select(range(min(max_test, len(ds))))
            spec = TaskData(str(data_dir / t), image_column="image" if inputs.modality == "image" else None)
            self.sets[t] = (inputs.encode(ds, spec), torch.tensor(ds["label"]), len(ds.features["label"].names))

    @torch.no_grad()
    def __call__(self, module: MergeModule, params=None, tasks: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Scores of ``module.predict`` with backbone ``params`` (default: the module's final merge), on the GPU
        when there is one (Lightning hands the module back on the CPU after fitting)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        module.to(device).eval()  # dropout off, whatever mode training left the module in
        own = params is None  # the module's merge: each task with its own BatchNorm statistics where it has them
        params = module.final_merged_params() if own else {k: v.to(device) for k, v in params.items()}
        out = {}
        for task in tasks or list(self.sets):
            rows, labels, n_cls = self.sets[task]
            task_params = module.task_params(task, params) if own else params
            out[task] = score(
                lambda b, task=task, p=task_params: module.predict(task, {k: v.to(device) for k, v in b.items()}, p),
                rows,
                labels,
                n_cls,
                self.inputs,
                batch_size=128,
            )
        return out


def adapt(
    module: MergeModule,
    data_dir: Path,
    tasks: list[str],
    split: str,
    preset: Preset,
    seed: int,
    steps: int,
    select: str | None = None,
    schedule: dict | None = None,
    early_stop: dict | None = None,
) -> dict | None:
    """Train a method's coefficients/masks on ``split`` of every task (no-op for data-free methods); ``select``: pick
    the exported step by this label-free criterion on ``preset.holdout`` held-back rows of the same split;
    ``schedule``: the learning rate's over the steps (:class:`LRSchedule`'s arguments; None: constant);
    ``early_stop``: stop once the selection criterion plateaus (:class:`SelectionEarlyStopping`'s arguments). A
    backbone with BatchNorm layers then gets its statistics re-estimated under the merge on the first
    ``preset.bn_batches`` steps of the same rows (every method alike, data-free ones included), one set for every
    task or each task's own (the module's ``batchnorm_statistics``, built from the preset's). Returns the label-free
    selection's record (``SelectStep.result``), or None without ``select``."""
    dm = UnlabeledDataModule(
        {t: preset.task_data(str(data_dir / t), split) for t in tasks},
        tokenizer=module.base_source,
        samples_per_task=preset.samples_per_task,
        max_length=preset.max_length,
        seed=seed,
        holdout=preset.holdout if select else 0,
    )
    if module.needs_data:
        module.use_data(dm)
    selection = None
    if module.trainable:
        pl.seed_everything(seed, verbose=False)
        # progress in steps of the whole row (a 2,000-step row on a CPU runs for hours)
        callbacks = [StepProgress(refresh_every=max(1, steps // 20))]
        selection = SelectStep(preset.select_every, select) if select else None
        callbacks += [selection] if selection else []
        stopper = SelectionEarlyStopping(**early_stop) if early_stop else None
        callbacks += [stopper] if stopper else []
        callbacks += [LRSchedule(**schedule)] if schedule else []
        trainer = pl.Trainer(
            max_steps=steps,
            logger=False,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="auto",
            devices=1,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=dm)
    if preset.bn_batches and module.has_batchnorm():
        module.recalibrate_batchnorm(dm.first_steps(preset.bn_batches))
    if selection is None:
        return None
    return {**selection.result, **({"stopped_step": stopper.stopped_step} if stopper else {})}


def check_sweep(row: Row) -> None:
    """Refuse a row whose sweep could not be chosen without labels: one without a selector, on a method that does
    not train, or with a swept setting also fixed in its kwargs (the candidates themselves are enumerated by
    :func:`adamerge.cli.sweep.search`)."""
    if not row.sweep:
        return
    if row.select is None or not METHODS[row.method].trainable:
        raise ValueError(
            f"row {row.label!r}: a sweep is chosen by the selection score of a trained method; "
            "set select, on a method that trains"
        )
    clash = sorted(set(row.sweep) & set(row.kwargs))
    if clash:
        raise ValueError(f"row {row.label!r}: {clash} both fixed in kwargs and swept")


_SWEPT = re.compile(r", \w+ \([^)]*\) and step by [\w -]+")
_CRITERIA = {"agreement": "expert agreement", "worst_agreement": "worst-task agreement"}


def with_grid(row: Row, grid: dict[str, list] | None = None, extend: int | None = None) -> Row:
    """``row`` with its sweep replaced by ``grid`` and/or its extension budget by ``extend`` (the benchmark's
    ``--grid`` / ``--extend``); the label says what is tried. A row that cannot be swept is refused by name."""
    if not grid and extend is None:
        return row
    sweep = {k: list(v) for k, v in (grid or row.sweep or {}).items()}
    if not sweep:
        raise ValueError(f"row {row.label!r}: --extend follows a sweep, and this row sweeps nothing; give --grid")
    if math.prod(len(v) for v in sweep.values()) < 2:
        raise ValueError(f"--grid {grid}: one candidate; give at least two values")
    extend = row.extend if extend is None else extend
    if extend and len(sweep) != 1:
        raise ValueError(
            f"row {row.label!r}: --extend follows one setting past its kept edge; the grid varies "
            f"{len(sweep)} ({', '.join(sweep)})"
        )
    if extend and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in next(iter(sweep.values()))):
        raise ValueError(f"row {row.label!r}: --extend needs numeric values of {next(iter(sweep))}")
    kwargs = {k: v for k, v in row.kwargs.items() if k not in sweep}
    out = replace(row, kwargs=kwargs, sweep=sweep, extend=extend)
    check_sweep(out)
    ours = row.label.endswith(" (ours)")
    plain = _SWEPT.sub("", row.label.removesuffix(" (ours)"))
    tried = ", ".join(
        f"{k} ({_span(vs)}{f'; up to {extend} more past a kept edge' if extend else ''})" for k, vs in sweep.items()
    )
    return replace(
        out, label=f"{plain}, {tried} and step by {_CRITERIA.get(row.select, row.select)}" + (" (ours)" if ours else "")
    )


def regrid(methods: list[str], grid: dict[str, list] | None = None, extend: int | None = None) -> dict[str, Row]:
    """The grid with each trained row of ``methods`` re-swept by :func:`with_grid` (data-free rows unchanged)."""
    return {
        k: with_grid(r, grid, extend) if k in methods and METHODS[r.method].trainable else r
        for k, r in METHOD_GRID.items()
    }


def _span(values: list) -> str:
    return (
        ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        if len(values) <= 3
        else f"{values[0]:g} … {values[-1]:g}"
    )


def adapts(row: Row) -> bool:
    cls = METHODS[row.method]
    return cls.trainable or row.kwargs.get("candidates", 1) > 1


def steps_for(row: Row, preset: Preset) -> int:
    if row.method == "surgery":
        return preset.surgery_steps
    return preset.steps + row.kwargs.get("meta_steps", 0)


@dataclass
class Built:
    """A row's adapted merge and what its training handed over: the label-free selection's record and, for a swept
    row, every candidate tried (``sweep``), the values added past a kept edge, and the diagnostic test scores of the
    kept one with the seconds they took."""

    module: MergeModule
    selection: dict | None = None
    sweep: list[dict] | None = None
    sweep_extended: int = 0
    test_scores: dict | None = None
    diagnose_seconds: float = 0.0


class Runner:
    """Runs rows of the grid for one preset, reusing the exported merges that Surgery rows start from."""

    def __init__(
        self,
        preset: Preset,
        base: str,
        paths: dict[str, str],
        data_dir: Path,
        ckpt_dir: Path,
        evaluator: Evaluator,
        seed: int,
        transductive: bool = True,
        heads: dict | None = None,
        rows: dict[str, Row] | None = None,
    ) -> None:
        self.preset, self.base, self.paths, self.data_dir, self.heads = preset, base, paths, data_dir, heads
        self.ckpt_dir, self.evaluator, self.seed, self.transductive = ckpt_dir, evaluator, seed, transductive
        self.rows = METHOD_GRID if rows is None else rows  # the grid, some rows re-swept (``with_grid``)

    def build(self, key: str, protocol: str, diagnose: bool = False) -> Built:
        """Instantiate and adapt row ``key`` under ``protocol`` (``inductive``/``transductive``); a row with a
        ``sweep`` trains once per candidate and returns the one whose selected step scores best (its ``sweep``
        lists every candidate's selected step and score, in the order trained). With ``extend``, while
        the kept value is the largest or smallest tried (no other candidate scoring the same), the next value on
        the grid's own spacing is trained too, at most ``extend`` more times (``adamerge sweep --extend``'s rule).

        ``diagnose``: also score every swept candidate on the test split (``sweep[i]["test"]``; the kept one's
        scores in ``test_scores``, seconds spent in ``diagnose_seconds``). A diagnostic of the
        label-free choice, made from the selection scores alone before any test score is read."""
        from adamerge import sweep_search

        row = self.rows[key]
        kwargs = dict(row.kwargs)
        if row.on is not None:
            kwargs["merged"] = str(self.export_of(row.on, protocol))
        split = "unlabeled" if protocol == "inductive" else "test"

        def train(values: dict) -> Built:
            module = METHODS[row.method](
                self.base,
                self.paths,
                task_type=self.preset.task_type,
                heads=self.heads,
                batchnorm_statistics=self.preset.batchnorm_statistics,
                **kwargs,
                **values,
            )
            selection = adapt(
                module,
                self.data_dir,
                self.preset.tasks,
                split,
                self.preset,
                self.seed,
                steps_for(row, self.preset),
                row.select,
                schedule=row.schedule,
                early_stop=row.early_stop,
            )
            return Built(module, selection)

        if not row.sweep:
            return train({})
        check_sweep(row)
        best, tried, spent = None, [], 0.0

        def score(values: dict) -> float:
            nonlocal best, spent
            built = train(values)
            sel = built.selection
            tried.append({**values, "selected_step": sel["selected_step"], "score": sel["score"]})
            log.info(
                "%s %s, %s: %s %.4f at step %d",
                row.label,
                protocol,
                values,
                sel["criterion"],
                sel["score"],
                sel["selected_step"],
            )
            if best is None or sel["score"] > best.selection["score"]:
                best = built
            if diagnose:  # after the choice above, which reads the selection scores only
                t0 = time.time()
                tried[-1]["test"] = self.evaluator(built.module)
                spent += time.time() - t0
            return sel["score"]

        _, added = sweep_search(
            {k: list(v) for k, v in row.sweep.items()}, score, row.extend, f"{row.label} {protocol}"
        )
        best.sweep, best.sweep_extended = tried, added
        if diagnose:
            best.test_scores, best.diagnose_seconds = _chosen(best.selection, tried)["test"], spent
        return best

    def export_of(self, key: str, protocol: str) -> Path:
        protocol = protocol if adapts(self.rows[key]) else "inductive"
        target = self.ckpt_dir / f"{key}-{protocol}"
        if not (target / "merge_manifest.json").is_file():
            self.build(key, protocol).module.export(target, overwrite=True, per_task_models=False)
        return target

    def row(self, key: str) -> dict:
        row = self.rows[key]
        out = {"label": row.label}
        if adapts(row) and not self.transductive:
            out["transductive"] = None  # adaptive, but the transductive column was not run
        for protocol in ("inductive", "transductive") if adapts(row) and self.transductive else ("inductive",):
            t0 = time.time()
            with PeakRSS() as mem:
                built = self.build(key, protocol, diagnose=protocol == "inductive")
            module = built.module
            out[f"{protocol}_seconds"] = round(time.time() - t0 - built.diagnose_seconds, 1)
            out[f"{protocol}_peak_rss_mib"] = round(mem.peak)
            out[protocol] = built.test_scores or self.evaluator(module)
            if protocol == "inductive":
                matrix = module.coefficient_matrix()
                out["coefficients"] = matrix.mean(dim=1).tolist()
                out["coefficient_blocks"] = coefficient_blocks(module, matrix)
            if built.selection:
                out[f"{protocol}_selection"] = {k: built.selection[k] for k in SELECTION_FIELDS if k in built.selection}
            if built.sweep:
                out[f"{protocol}_sweep"] = built.sweep
                if row.extend:
                    out[f"{protocol}_sweep_extended"] = built.sweep_extended
            if row.on is None and any(r.on == key for r in METHOD_GRID.values()):
                module.export(self.ckpt_dir / f"{key}-{protocol}", overwrite=True, per_task_models=False)
            log.info("%s %s: %.4f (%.0fs)", row.label, protocol, _avg(out[protocol]), out[f"{protocol}_seconds"])
            del module, built
        return out

    def pairs(self) -> dict:
        """Two-task merges of every task pair: TA, weight average, M3 (Beta draw; best of 8 by entropy)."""
        from itertools import combinations

        grid = {
            "Task Arithmetic (λ=0.3)": ("task_arithmetic", {"scale": 0.3}),
            "Weight average": ("average", {}),
            "M3 (Beta α=0.5, 1 draw)": ("m3", {"alpha": 0.5, "seed": 0}),
            "M3 (best of 8 by entropy)": ("m3", {"alpha": 0.5, "seed": 0, "candidates": 8}),
        }
        results = {label: {} for label in grid}
        for a, b in combinations(self.preset.tasks, 2):
            sub = {a: self.paths[a], b: self.paths[b]}
            for label, (name, kwargs) in grid.items():
                module = METHODS[name](
                    self.base,
                    sub,
                    task_type=self.preset.task_type,
                    heads=self.heads,
                    batchnorm_statistics=self.preset.batchnorm_statistics,
                    **kwargs,
                )
                sub_preset = Preset([a, b], **{k: v for k, v in vars(self.preset).items() if k != "tasks"})
                adapt(module, self.data_dir, [a, b], "unlabeled", sub_preset, self.seed, 0)
                scores = self.evaluator(module, tasks=[a, b])
                results[label][f"{a}+{b}"] = {
                    "accuracy": _avg(scores),
                    "weights": module.coefficient_matrix()[:, 0].tolist(),
                }
        return results


REFERENCE_ROWS = ("individual", "pretrained", "pretrained_bn")  # every call recomputes them; never a merge


def individual_rows(module: MergeModule, evaluator: Evaluator, tasks: list[str]) -> dict[str, dict]:
    """Each fine-tune on its own task (one-hot coefficients), and the pretrained backbone with each task's head."""
    one_hot = {t: evaluator(module, module.merged.expert_params(t), [t])[t] for t in tasks}
    zero = torch.zeros_like(module.merged.one_hot(tasks[0]))
    return {
        "individual": {"label": "Individual fine-tuned models", "inductive": one_hot},
        "pretrained": {
            "label": "Pretrained encoder + task heads",
            "inductive": evaluator(module, module.merged.merged_params(zero)),
        },
    }


def pretrained_recalibrated_row(
    base: str,
    paths: dict[str, str],
    preset: Preset,
    data_dir: Path,
    evaluator: Evaluator,
    seed: int,
    heads: dict | None,
) -> dict:
    """BatchNorm backbones: the pretrained backbone with each task's head, its BatchNorm statistics re-estimated on
    the unlabeled rows as every merge's are (the merge with all coefficients 0). The plain pretrained row keeps the
    base's own (ImageNet) statistics, which is how heads fitted on them read it; heads fitted under the tasks' own
    statistics (the ``frozen-adabn`` zoo) read it this way."""
    module = METHODS["task_arithmetic"](
        base,
        paths,
        task_type=preset.task_type,
        heads=heads,
        scale=0.0,
        batchnorm_statistics=preset.batchnorm_statistics,
    )
    adapt(module, data_dir, preset.tasks, "unlabeled", preset, seed, 0)
    return {
        "label": "Pretrained encoder + task heads, BatchNorm statistics re-estimated as every merge's",
        "inductive": evaluator(module),
    }


def run_lora(
    preset: Preset,
    base: str,
    data_dir: Path,
    zoo: Path,
    evaluator: Evaluator,
    ckpt_dir: Path,
    seed: int,
    heads: dict | None = None,
    methods: list[str] | None = None,
    transductive: bool = True,
    rows: dict | None = None,
    saved=lambda: None,
) -> dict:
    """The LoRA section: a PEFT LoRA zoo of the preset's tasks and merges of the adapters (kept low-rank).
    ``methods``: its rows (``None``: the preset's ``lora_methods``); ``heads``: as the main table's. Rows are
    added to ``rows`` (returned), ``saved()`` called after each one (a row finished is a row kept)."""
    paths = {
        t: str(
            finetune(
                t,
                data_dir,
                zoo,
                epochs=preset.ft_epochs,
                max_length=preset.max_length,
                lr=5e-4,
                lora_rank=preset.lora_rank,
            )
        )
        for t in preset.tasks
    }
    ref = METHODS["task_arithmetic"](base, paths, heads=heads)
    rows = {} if rows is None else rows
    rows.update(individual_rows(ref, evaluator, preset.tasks))
    rows["individual"]["label"] = f"Individual LoRA adapters (r={preset.lora_rank})"
    rows["pretrained"]["label"] += " (LoRA heads)"
    del ref
    saved()
    runner = Runner(preset, base, paths, data_dir, ckpt_dir, evaluator, seed, transductive, heads)
    for key in preset.lora_methods if methods is None else methods:
        rows[key] = runner.row(key)
        rows[key]["label"] = f"{METHOD_GRID[key].label} over LoRA adapters"
        saved()
    return rows


def result_lora_rows(preset: Preset, lora: bool, methods: list[str] | None) -> list[str]:
    """The LoRA rows a call runs (none when it skips the section)."""
    if not (preset.lora_rank and lora):
        return []
    return list(preset.lora_methods if methods is None else methods)


def provenance(argv: list[str], script: str = "benchmarks/benchmark.py") -> dict:
    """What a results file records of the call that wrote it: the command, the code's commit (``+dirty`` when
    tracked files differ from it) and the date (UTC)."""
    import shlex
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short=7", "HEAD")
    if not commit:  # a copy of the tree without its git folder (a GPU machine): scripts/gpu_check.sh says which
        commit = os.environ.get("ADAMERGE_COMMIT", "unknown")
    elif git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "command": shlex.join(["python", script, *argv]),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def results_dir(
    out: Path,
    preset_name: str,
    zoo_protocol: str = "own",
    head_pooler: bool = False,
    batchnorm_statistics: str = "batch",
) -> Path:
    """Where :func:`run` writes a preset's table: ``out/<preset>`` (own heads) or ``out/<preset>-<protocol>-head``,
    with ``-pooler`` appended when each head keeps its fine-tune's pooler, ``-bn-task`` with per-task BatchNorm
    statistics."""
    name = preset_name if zoo_protocol == "own" else f"{preset_name}-{zoo_protocol}-head"
    return out / (name + ("-pooler" if head_pooler else "") + ("-bn-task" if batchnorm_statistics == "task" else ""))


def check_overrides(steps: int | None = None, samples_per_task: int | None = None) -> None:
    """Refuse an override of the preset's adaptation steps or rows per task that is not an integer >= 1, naming
    it (:func:`run` calls this before any data or zoo is made)."""
    for name, value in (("steps", steps), ("samples_per_task", samples_per_task)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def run(
    preset_name: str = "quick",
    work: Path = Path(".cache"),
    out: Path = Path("runs/benchmark"),
    methods: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    fresh: bool = False,
    lora: bool = True,
    zoo_protocol: str = "own",
    transductive: bool = True,
    pairs: bool = True,
    head_pooler: bool = False,
    batchnorm_statistics: str | None = None,
    grid: dict[str, list] | None = None,
    extend: int | None = None,
    samples_per_task: int | None = None,
    lora_methods: list[str] | None = None,
    provenance: dict | None = None,
) -> dict:
    """Build everything the preset needs (skipping what exists) and write ``out/<preset>/results.{json,md}``
    (``out/<preset>-frozen-head/`` for the frozen-head zoo).

    ``methods``: grid rows to (re-)run (``None``: all of the preset's); rows already in an earlier ``results.json``
    of the same setup are kept unless re-run (or ``fresh``). ``lora``: run the LoRA section if the preset has one
    (own-head zoo only). ``zoo_protocol``: ``own`` or ``frozen`` heads (see :mod:`benchmarks.zoo`).
    ``transductive``: also adapt on the test inputs (the papers' protocol) for the second column. ``pairs``: run the
    two-task table if the preset has one (own-head zoo only). ``head_pooler``: every row (the reference rows too)
    with each task's head holding its fine-tune's pooler (``heads: {pooler: true}``, BERT-style backbones); LoRA
    section skipped. ``batchnorm_statistics``: override the preset's (``task``: each task its own BatchNorm
    statistics, a table of its own). ``grid`` / ``extend``: every row of ``methods`` that trains with a label-free
    selector
    sweeps ``grid`` (e.g. ``{"lr": [0.1, 0.3]}``) instead of its own values and/or follows a kept edge up to
    ``extend`` more values (:func:`with_grid`); data-free rows (and the LoRA section's) are left as they are, a
    trained row without a selector is refused. ``steps`` / ``samples_per_task``: override the preset's adaptation
    steps / unlabeled rows per task in each step.
    """
    check_overrides(steps, samples_per_task)
    preset = PRESETS[preset_name]
    if zoo_protocol in BATCHNORM_PROTOCOLS and not preset.image:
        raise ValueError(
            f"zoo_protocol {zoo_protocol!r} re-estimates BatchNorm statistics: vision presets only "
            f"({preset_name!r} is a text preset)"
        )
    if batchnorm_statistics is not None:
        if batchnorm_statistics not in ("batch", "task"):
            raise ValueError(f"batchnorm_statistics: {batchnorm_statistics!r}; allowed: batch, task")
        preset = replace(preset, batchnorm_statistics=batchnorm_statistics)
    if steps is not None:
        preset = replace(preset, steps=steps)
    if samples_per_task is not None:
        preset = replace(preset, samples_per_task=samples_per_task)
    methods = preset.methods if methods is None else methods
    unknown = sorted(set(methods) - set(METHOD_GRID))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHOD_GRID)}")
    grid_rows = regrid(methods, grid, extend)
    root = work / ("ci" if preset_name == "ci" else "vision" if preset.image else "")
    data_dir, zoo = root / "data", root / ("zoo" if preset.image_size == IMAGE_SIZE else f"zoo-{preset.image_size}px")
    target = results_dir(out, preset_name, zoo_protocol, head_pooler, preset.batchnorm_statistics)
    heads = {"pooler": True} if head_pooler else None
    t0 = time.time()
    sizes = dict(seed=seed, max_train=preset.max_train, max_unlabeled=preset.max_unlabeled, max_test=preset.max_test)
    if preset.image:  # the vision benchmark: packaged ImageNet MobileNetV2 and image tasks
        from benchmarks.vision import build_vision_base, finetune_vision, prepare_vision

        card = prepare_vision(preset.tasks, data_dir, work / "wheels", **sizes)
        base = str(build_vision_base(zoo, work / "wheels", preset.image_size))
        paths = {
            t: str(finetune_vision(t, data_dir, zoo, Path(base), epochs=preset.ft_epochs, head=zoo_protocol))
            for t in preset.tasks
        }
    else:
        card = prepare(preset.tasks, data_dir, work / "wheels", **sizes)
        base = str(build_base(zoo))
        paths = {
            t: str(finetune(t, data_dir, zoo, epochs=preset.ft_epochs, max_length=preset.max_length, head=zoo_protocol))
            for t in preset.tasks
        }
    zoo_seconds = time.time() - t0
    inputs = input_builder(
        {t: preset.task_data(str(data_dir / t), "test") for t in preset.tasks}, base, preset.max_length
    )
    evaluator = Evaluator(data_dir, preset.tasks, inputs, preset.max_test)
    runner = Runner(
        preset, base, paths, data_dir, target / "checkpoints", evaluator, seed, transductive, heads, grid_rows
    )
    if zoo_protocol != "own":
        lora = False

    previous = target / "results.json"
    old = json.loads(previous.read_text()) if previous.is_file() and not fresh else {}
    if old and (
        old.get("tasks") != preset.tasks
        or any(old["preset_config"].get(k) != getattr(preset, k) for k in ("steps", "samples_per_task"))
    ):
        old = {}  # different setup: start a fresh table
    ref = METHODS["task_arithmetic"](base, paths, task_type=preset.task_type, heads=heads)
    rows: dict[str, dict] = individual_rows(ref, evaluator, preset.tasks)
    if ref.has_batchnorm():
        rows["pretrained_bn"] = pretrained_recalibrated_row(base, paths, preset, data_dir, evaluator, seed, heads)
    del ref
    result = {
        "preset": preset_name,
        "zoo_protocol": zoo_protocol,
        "head_pooler": head_pooler,
        "batchnorm_statistics": preset.batchnorm_statistics,
        "preset_config": {k: v for k, v in vars(preset).items() if k != "methods"},
        "tasks": preset.tasks,
        "rows": rows,
        "data_card": card,
        "zoo_seconds": round(zoo_seconds, 1),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
    }
    if provenance is not None:  # which calls made this table: each one's command, commit, date and rows
        call = dict(provenance, rows=list(methods), lora_rows=list(result_lora_rows(preset, lora, lora_methods)))
        result["runs"] = [*old.get("runs", []), call]
    if grid or extend is not None:  # how this call's rows were re-swept (the labels say it too)
        result["sweep_override"] = {
            "grid": grid,
            "extend": extend,
            "rows": [k for k in methods if grid_rows[k] is not METHOD_GRID[k]],
        }
    rows.update({k: v for k, v in old.get("rows", {}).items() if k in METHOD_GRID and k not in methods})
    refused = {k: v for k, v in old.get("refused", {}).items() if k in METHOD_GRID and k not in methods}
    result["refused"] = refused  # rows whose method refused this model (WEMoE on a CNN): the reason, no figure
    for key in METHOD_GRID:
        if key in methods:
            try:
                rows[key] = runner.row(key)
            except MergeInputError as e:  # the method does not apply to this model: say so, run the other rows
                log.warning("%s refused this model: %s", key, e)
                refused[key] = str(e)
            _save(result, target, t0)  # a row finished is a row kept, whatever happens to the next one
    if preset.pairs and pairs and zoo_protocol == "own" and (methods == preset.methods or "pairs" not in old):
        result["pairs"] = runner.pairs()
    elif "pairs" in old:
        result["pairs"] = old["pairs"]
    if preset.lora_rank and lora:
        chosen = preset.lora_methods if lora_methods is None else lora_methods
        # rows of an earlier LoRA table of the same setup are kept unless re-run (as the main table's)
        result["lora"] = {k: v for k, v in old.get("lora", {}).items() if k in METHOD_GRID and k not in chosen}
        run_lora(
            preset,
            base,
            data_dir,
            zoo,
            evaluator,
            target / "checkpoints-lora",
            seed,
            heads,
            lora_methods,
            transductive,
            result["lora"],
            lambda: _save(result, target, t0),
        )
        order = [*REFERENCE_ROWS, *METHOD_GRID]
        result["lora"] = dict(sorted(result["lora"].items(), key=lambda kv: order.index(kv[0])))
    elif "lora" in old:
        result["lora"] = old["lora"]
    _save(result, target, t0)
    return result


def _save(result: dict, target: Path, t0: float) -> None:
    """Write the table so far, stamped with the time since ``t0`` and this process's peak memory."""
    result["total_seconds"] = round(time.time() - t0, 1)
    result["peak_rss_mib"] = round(peak_rss_mib())
    write_results(result, target)


def write_results(result: dict, target: Path) -> None:
    """``target``/results.json and results.md, rows in the grid's order, each file replaced whole."""
    order = [*REFERENCE_ROWS, *METHOD_GRID]
    rows = sorted(result["rows"].items(), key=lambda kv: order.index(kv[0]))
    result["rows"].clear()
    result["rows"].update(rows)  # in place: the caller keeps adding to the same dict
    target.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=2) + "\n"), ("results.md", render(result) + "\n")):
        tmp = target / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(target / name)


def coefficient_blocks(module: MergeModule, matrix: torch.Tensor) -> dict:
    """The ``[T, P]`` coefficients of a row as the model card tabulates them: per task the mean over each block's
    tensors (embeddings, each layer, ...), for ``benchmarks/plot_coefficients.py``."""
    from adamerge import coefficient_table

    granularity = module.merged.coefficients.granularity
    blocks, values = coefficient_table(
        {
            "effective": matrix.tolist(),
            "params": module.merged.param_names,
            "tasks": module.task_names,
            "granularity": granularity,
        }
    )
    return {"tasks": list(module.task_names), "blocks": blocks, "values": values}


def _avg(per_task: dict, key: str = "accuracy") -> float:
    return sum(v[key] for v in per_task.values()) / len(per_task)


def table(rows: dict, tasks: list[str]) -> list[str]:
    head = [
        "method",
        *tasks,
        "avg (inductive)",
        "avg macro-F1",
        "avg (transductive)",
        "selected step",
        "load+adapt s",
        "peak RSS MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        ind = row["inductive"]
        tr = row.get("transductive")
        sel = row.get("inductive_selection")
        cells = [
            row["label"],
            *(f"{100 * ind[t]['accuracy']:.1f}" for t in tasks),
            f"**{100 * _avg(ind):.1f}**",
            f"{100 * _avg(ind, 'macro_f1'):.1f}",
            f"{100 * _avg(tr):.1f}" if tr else ("not run" if "transductive" in row else "(same)"),
            _selected(sel, row.get("inductive_sweep")),
            str(row.get("inductive_seconds", "–")),
            str(row.get("inductive_peak_rss_mib", "–")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _chosen(sel: dict, sweep: list[dict]) -> dict:
    """The swept candidate a row kept: the first with the row's selected step and score."""
    return next(c for c in sweep if c["score"] == sel["score"] and c["selected_step"] == sel["selected_step"])


def _setting(candidate: dict) -> dict:
    """The swept values of a candidate (its record also holds its selected step, score and test diagnostic)."""
    return {k: v for k, v in candidate.items() if k not in ("selected_step", "score", "test")}


def _values(candidate: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in _setting(candidate).items())


def _selected(sel: dict | None, sweep: list[dict] | None) -> str:
    if not sel:
        return "–"
    return f"{sel['selected_step']} ({_values(_chosen(sel, sweep))})" if sweep else str(sel["selected_step"])


def sweep_lines(rows: dict) -> list[str]:
    """One line per swept row: every candidate's selected step and label-free score, the one kept, and (where
    measured) each candidate's test average — a diagnostic of the choice, which it did not enter."""
    lines = []
    for row in rows.values():
        sweep, sel = row.get("inductive_sweep"), row.get("inductive_selection")
        if sweep:
            tried = "; ".join(
                f"{_values(c)}: {c['score']:.4f} at step {c['selected_step']}"
                + (f" (test avg {100 * _avg(c['test']):.1f})" if "test" in c else "")
                for c in sweep
            )
            kept = _chosen(sel, sweep)
            edges = at_edge([_setting(c) for c in sweep], sweep.index(kept), [c["score"] for c in sweep])
            edge = "".join(f" ({k}: the {side} tried; the best may lie beyond)" for k, side in edges.items())
            added = row.get("inductive_sweep_extended")
            extended = (
                f" The last {f'{added} values' if added > 1 else 'value'} tried extended the grid past a kept edge."
                if added
                else ""
            )
            lines.append(
                f"- {row['label']} — {sel['criterion']} on the held-back rows, {tried} → kept "
                f"{_values(kept)}{edge}.{extended}"
            )
    if any("test" in c for row in rows.values() for c in row.get("inductive_sweep") or []):
        lines.append(
            "- The test averages are scored after the choice, as a diagnostic of it; no test label entered the choice."
        )
    return lines


def _scored(row: dict, task: str) -> str:
    """A row's label, its accuracy on ``task`` in % and, where recorded, its predicted-class histogram."""
    m = row["inductive"][task]
    return f"{row['label']} {100 * m['accuracy']:.1f}" + (f" {m['predicted']}" if "predicted" in m else "")


def below_pretrained_lines(rows: dict, tasks: list[str]) -> list[str]:
    """One line per task where a merge scores below the pretrained row (issue 14: no adaptive row may): each such
    row's accuracy and, where recorded, its predicted-class histogram beside the pretrained row's and the test
    labels' — an accuracy near the majority class's share reads differently from one spread over the classes."""
    ref = rows.get("pretrained")
    if not ref:
        return []
    lines = []
    for task in tasks:
        base = ref["inductive"][task]
        below = [
            r
            for k, r in rows.items()
            if k not in REFERENCE_ROWS and r["inductive"][task]["accuracy"] < base["accuracy"]
        ]
        if not below:
            continue
        labels = f" (test rows per class {base['labels']})" if "labels" in base else ""
        lines.append(
            f"- {task}{labels}: {_scored(ref, task)}; below it: " + "; ".join(_scored(r, task) for r in below) + "."
        )
    if lines:
        lines.insert(
            0, "Merges below the pretrained row, by task (accuracy in %, and rows predicted per class where recorded):"
        )
        lines.insert(1, "")
    return lines


def render(result: dict) -> str:
    tasks = result["tasks"]
    lines = table(result["rows"], tasks)
    c = result["preset_config"]
    protocol = {
        "own": "own-head zoo (each head trained with its body)",
        "frozen": "frozen-head zoo (linear-probe heads fixed before fine-tuning, LP-FT)",
        "frozen-adabn": "frozen-head zoo, probes fitted under each task's own BatchNorm statistics (AdaBN, then LP-FT)",
    }[result.get("zoo_protocol", "own")]
    from benchmarks.vision import FT_LR

    side = c.get("image_size", IMAGE_SIZE)
    inputs = (
        f"images {side}×{side}, zoo fine-tuned {c['ft_epochs']} epochs at lr {FT_LR:g}, BatchNorm "
        f"statistics of every merge re-estimated on {c.get('bn_batches')} steps of its unlabeled rows"
        + (
            " — each task's own, on its rows alone, which training also normalises apart (per-task BatchNorm "
            "statistics)"
            if c.get("batchnorm_statistics") == "task"
            else ""
        )
        if c.get("task_type", "seq_cls") != "seq_cls"
        else f"max length {c['max_length']}"
    )
    if result.get("head_pooler"):
        protocol += "; every head, the reference rows' too, holds its fine-tune's pooler (`heads: {pooler: true}`)"
    lines += [
        "",
        f"Zoo protocol: {protocol}. Preset `{result['preset']}`: {len(tasks)} tasks, {c['steps']} adaptation steps, "
        f"{c['samples_per_task']} samples/task/step, {inputs}. "
        f"Accuracy in % on each task's test split with its own head. Total {result['total_seconds']} s "
        f"(data + zoo {result['zoo_seconds']} s), peak RSS {result['peak_rss_mib']} MiB, {result['hardware']}.",
    ]
    swept = sweep_lines(result["rows"])
    if swept:
        lines += ["", "Swept rows (label-free choice among the runs):", "", *swept]
    below = below_pretrained_lines(result["rows"], tasks)
    if below:
        lines += ["", *below]
    gap = _gap_closed(result["rows"])
    if gap:
        lines += ["", gap]
    for key, why in result.get("refused", {}).items():
        lines += ["", f"{METHOD_GRID[key].label}: refused this model — {why}"]
    if "pairs" in result:
        lines += [
            "",
            "Two-task merges, average accuracy over both tasks of each pair (inductive):",
            "",
            "| method | " + " | ".join(next(iter(result["pairs"].values()))) + " | mean |",
            "|---|" + "---|" * (len(next(iter(result["pairs"].values()))) + 1),
        ]
        for label, per_pair in result["pairs"].items():
            accs = [v["accuracy"] for v in per_pair.values()]
            lines.append(
                f"| {label} | "
                + " | ".join(f"{100 * a:.1f}" for a in accs)
                + f" | **{100 * sum(accs) / len(accs):.1f}** |"
            )
    if "lora" in result:
        lines += [
            "",
            f"LoRA adapters (PEFT, r={c.get('lora_rank')}, targets query/key/value/dense, classifier saved; "
            "task vectors kept low-rank):",
            "",
            *table(result["lora"], tasks),
        ]
    return "\n".join(lines)


def _gap_closed(rows: dict) -> str:
    """How much of the gap between a merge and the individual models Surgery closes."""
    ind = _avg(rows["individual"]["inductive"])
    parts = []
    for key, row in METHOD_GRID.items():
        if row.on and key in rows and row.on in rows:
            before, after = _avg(rows[row.on]["inductive"]), _avg(rows[key]["inductive"])
            if ind > before:
                parts.append(
                    f"{row.label} closes {100 * (after - before) / (ind - before):.0f}% of the gap between "
                    f"{METHOD_GRID[row.on].label} ({100 * before:.1f}) and the individual models "
                    f"({100 * ind:.1f})."
                )
    return " ".join(parts)
