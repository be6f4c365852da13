"""``adamerge init``: check a base and its fine-tunes, and print the config that merges them with the recommended
recipe — a commented YAML that ``adamerge fit --config`` runs as it is and a user edits.

The recipe follows what the models are (docs/results.md has the measurements behind each):

- fine-tunes that trained their own heads (text or image classifiers, LoRA adapters with their heads): the
  expert-guided recipe — layer-wise coefficients (over TSV-M's pieces for transformers' dense weights), each head
  tuned, KL to each task's own fine-tune, the exported step chosen without labels. Never entropy: on such heads it
  collapses onto one class.
- CLIP/SigLIP (zero-shot heads built from the base's text tower, the papers' setting): layer-wise AdaMerging with
  the papers' entropy, the step chosen by agreement with the experts.
- causal and seq2seq LMs (merged whole): layer-wise coefficients with KL to each fine-tune (arcee DAM's objective).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adamerge.errors import MergeInputError

KINDS_OF_ARCHITECTURE = (
    ("ForSequenceClassification", "seq_cls"),
    ("ForImageClassification", "image_cls"),
    ("ForCausalLM", "causal_lm"),
    ("ForConditionalGeneration", "seq2seq_lm"),
    ("ForSeq2SeqLM", "seq2seq_lm"),
)
PEFT_KINDS = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq_lm"}
CLIP_BASES = ("CLIPModel", "SiglipModel", "Siglip2Model")


def pairs(values: list[str], flag: str) -> dict[str, str]:
    """``TASK=PATH`` pairs (repeated, or several after one flag) as a dict; a malformed or repeated task is refused."""
    out: dict[str, str] = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise MergeInputError(f"{flag} {value!r}: expected TASK=PATH (e.g. {flag} sst2=./my-sst2-model)")
        if task in out:
            raise MergeInputError(f"{flag}: task {task!r} is given twice")
        out[task] = path
    return out


def kind_of(base: str, models: dict[str, str]) -> str:
    """The model kind (``task_type``) the base and fine-tunes are, read from their configs."""
    from transformers import AutoConfig

    from adamerge.io.sources import is_lora_adapter

    base_arch = (AutoConfig.from_pretrained(base).architectures or [""])[0]
    if base_arch in CLIP_BASES:
        return "clip"
    found = {}
    for task, source in models.items():
        if is_lora_adapter(source):
            peft_type = json.loads((Path(source) / "adapter_config.json").read_text()).get("task_type")
            kind = PEFT_KINDS.get(str(peft_type))
            if kind is None:
                raise MergeInputError(
                    f"--models {task}: LoRA adapter of PEFT task_type {peft_type!r}; adamerge merges "
                    f"{', '.join(PEFT_KINDS)} adapters"
                )
        else:
            arch = (AutoConfig.from_pretrained(source).architectures or ["?"])[0]
            kind = next((k for suffix, k in KINDS_OF_ARCHITECTURE if arch.endswith(suffix)), None)
            if kind is None:
                raise MergeInputError(
                    f"--models {task}: {source} is a {arch}; adamerge merges sequence and image classifiers, causal "
                    "and seq2seq LMs, and CLIP/SigLIP vision towers (with a CLIPModel/SiglipModel base)"
                )
        found[task] = kind
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        raise MergeInputError(f"--models: the fine-tunes are of different kinds {found}; merge one kind at a time")
    return kinds[0]


def has_pooler(pool) -> bool:
    """Whether the backbone has a pooler its classification heads read (BERT-style)."""
    return any(name.startswith("pooler.") for name, _ in pool.backbone.named_parameters())


def recipe(kind: str, lora: bool, pooler: bool, method: str | None) -> tuple[str, dict, str]:
    """``(class name, its arguments, the comment that explains them)``."""
    if method not in (None, "recommended"):
        from adamerge.methods import get_method

        cls = get_method(method)
        if cls.method == "surgery":
            raise MergeInputError("--method surgery adapts an export: merge first, then see the guide's Surgery part")
        return (
            cls.__name__,
            ({"objective": {"name": "kl", "temperature": 2.0}} if cls.trainable and kind != "clip" else {}),
            f"`{method}` as asked (--method)",
        )
    if kind == "clip":
        return (
            "AdaMerging",
            {"granularity": "layer", "init": 0.3, "objective": "entropy"},
            "layer-wise AdaMerging with the papers' entropy: CLIP's zero-shot heads are the setting it was "
            "published on",
        )
    if kind in ("causal_lm", "seq2seq_lm"):
        return (
            "AdaMerging",
            {"granularity": "layer", "init": 0.3, "objective": {"name": "kl", "temperature": 2.0}},
            "layer-wise coefficients with KL to each fine-tune on its own text (arcee DAM's objective)",
        )
    args = {"granularity": "layer"}
    if not lora and kind == "seq_cls":  # TSV-M's pieces: dense matrices (not LoRA factors, not convolutions)
        args.update(prep={"subspace": "tsv"}, init=1.0)
    else:
        args.update(init=0.3)
    args.update(objective={"name": "kl", "temperature": 2.0}, tune_heads=True, lr=0.001)
    if pooler:
        args["heads"] = {"pooler": True}
    return (
        "AdaMerging",
        args,
        "the expert-guided recipe for fine-tunes that trained their own heads: layer-wise coefficients"
        + (" over TSV-M's per-task pieces (init 1.0 starts at TSV-M itself)" if "prep" in args else "")
        + ", each head tuned, KL to each task's own fine-tune; the exported step is chosen without labels. "
        "Not entropy: on heads trained with their bodies it collapses onto one class",
    )


def _yaml(value) -> str:
    """``value`` as one line of flow-style YAML."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # a plain scalar's end-of-document marker


def _comment(text: str) -> list[str]:
    import textwrap

    return [f"# {line}" for line in textwrap.wrap(text, 116)]


def render(
    base: str,
    models: dict[str, str],
    data: dict[str, str],
    kind: str,
    cls_name: str,
    args: dict,
    why: str,
    output_dir: str,
    trains: bool,
) -> str:
    """The config's text, one commented line per setting a user may want to change."""
    comments = {
        "granularity": "one coefficient per task and weight tensor (task: one per task)",
        "prep": "merge over TSV-M's per-task pieces of the task vectors",
        "init": "the coefficients' start",
        "objective": "what the merge learns from (see `adamerge fit --help`)",
        "tune_heads": "also tune each task's head (exported as ordinary heads)",
        "heads": "each task's head keeps its fine-tune's pooler (BERT-style models)",
        "lr": "learning rate of the coefficients",
    }
    lines = [
        f"# {'adamerge fit' if trains else 'adamerge merge'} --config <this file>  (written by adamerge init)",
        *_comment(f"{len(models)} {kind} fine-tunes of {base}. Recipe: {why}."),
        "# Measured results: docs/results.md; every setting: adamerge fit --help.",
    ]
    lines += [
        "seed_everything: 0",
        "model:",
        f"  class_path: adamerge.methods.{cls_name}",
        "  init_args:",
        f"    base: {_yaml(base)}",
        "    models:",
    ]
    lines += [f"      {_yaml(t)}: {_yaml(p)}" for t, p in models.items()]
    if kind != "seq_cls":
        lines.append(f"    task_type: {kind}")
    if kind == "clip":
        heads = {t: {"dataset": {"path": data[t]}} for t in models}
        lines.append(
            f"    heads: {_yaml(heads)}  # class names from each dataset's label column (or classnames: [...])"
        )
    for key, value in args.items():
        note = f"  # {comments[key]}" if key in comments else ""
        lines.append(f"    {key}: {_yaml(value)}{note}")
    if not trains:
        lines += [f"output_dir: {_yaml(output_dir)}", "per_task_models: true"]
        return "\n".join(lines) + "\n"
    lines += ["data:", "  tasks:  # unlabeled rows per task: .txt files or folders, .csv/.json with a `text` column"]
    for task in models:
        spec = {"path": data[task]} if kind != "clip" else {"path": data[task], "image_column": "image"}
        lines.append(f"    {_yaml(task)}: {_yaml(spec)}")
    lines += [
        "  samples_per_task: 16  # rows of each task in a training step",
        "  max_length: 128       # tokens per row",
        "  holdout: 64           # rows per task held back for the label-free choice of the exported step",
        "trainer:",
        "  max_steps: 500",
        "  accelerator: auto",
        "  enable_progress_bar: false  # StepProgress below: one bar in steps for the whole run",
        "  callbacks:",
        "    - class_path: adamerge.training.StepProgress",
        "    - class_path: adamerge.training.SelectStep  # export the step that agrees best with the fine-tunes",
        "      init_args: {every_n_steps: 10, criterion: agreement}",
        "    - class_path: adamerge.training.SelectionEarlyStopping  # stop once that agreement has not risen by",
        "      init_args: {patience: 10, noise_rows: 1}             # more than one held-back row for 10 scorings",
        "                                                           # (100 steps); the best step is still exported",
        "  logger:  # W&B, offline (sync later with `wandb sync`); never prompts",
        "    class_path: pytorch_lightning.loggers.WandbLogger",
        "    init_args: {offline: true, project: adamerge, save_dir: runs}",
        "export:",
        f"  output_dir: {_yaml(output_dir)}  # a Hugging Face directory stock transformers loads",
    ]
    return "\n".join(lines) + "\n"


def init(
    base: str, models: dict[str, str], data: dict[str, str], output_dir: str = "runs/merged", method: str | None = None
) -> str:
    """Check the models (loaded once, as ``fit`` will: same base, kind, heads present, vocabularies) and the data
    paths, and return the config text."""
    import logging

    from adamerge.io.sources import is_lora_adapter
    from adamerge.pool import load_pool

    if not models:
        raise MergeInputError("--models: give each fine-tune as TASK=PATH")
    kind = kind_of(base, models)
    missing = sorted(set(models) - set(data))
    extra = sorted(set(data) - set(models))
    if kind != "causal_lm" and (missing or extra) or extra:
        raise MergeInputError(
            f"--data: give unlabeled data for each task of --models as TASK=PATH (missing "
            f"{missing}, not a model {extra})"
        )
    for task, path in data.items():
        if not Path(path).exists():
            raise MergeInputError(f"--data {task}: {path} does not exist")
    heads = {t: {"dataset": {"path": data[t]}} for t in models} if kind == "clip" else None
    pool = load_pool(base, models, task_type=kind, heads=heads)
    lora = any(is_lora_adapter(s) for s in models.values())
    cls_name, args, why = recipe(kind, lora, kind == "seq_cls" and has_pooler(pool), method)
    logging.getLogger("adamerge").info(
        "checked %d %s fine-tunes of %s: %s", len(models), kind, base, ", ".join(pool.task_names)
    )
    from adamerge.methods import METHODS

    trains = next(c for c in METHODS.values() if c.__name__ == cls_name).trainable
    return render(base, models, data, kind, cls_name, args, why, output_dir, trains)


def init_main(argv: list[str]) -> str | None:
    parser = argparse.ArgumentParser(
        prog="adamerge init",
        description="Check a base model and its fine-tunes and print the config that merges them (the recommended "
        "recipe for what they are): adamerge init ... > merge.yaml; adamerge fit --config merge.yaml",
    )
    parser.add_argument(
        "--base", required=True, help="the pretrained model the fine-tunes started from (dir or hub id)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        action="extend",
        required=True,
        metavar="TASK=PATH",
        help="each fine-tune (a directory, hub id or PEFT LoRA adapter) under its task's name",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        default=[],
        metavar="TASK=PATH",
        help="unlabeled data of each task: a .txt file or folder, .csv/.json/.parquet, a saved dataset",
    )
    parser.add_argument("--output_dir", default="runs/merged", help="where fit writes the merged model")
    parser.add_argument("--method", default=None, help="a method name instead of the recommended recipe (e.g. ties)")
    parser.add_argument("--out", default=None, help="write the config to this file (default: print it)")
    a = parser.parse_args(argv)
    text = init(a.base, pairs(a.models, "--models"), pairs(a.data, "--data"), a.output_dir, a.method)
    if a.out is None:
        return text
    if Path(a.out).exists():
        raise MergeInputError(f"--out {a.out} already exists; choose another name or delete it")
    Path(a.out).write_text(text)
    return None
